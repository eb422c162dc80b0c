"""Process helpers shared by the server launchers: polling, parent-death signals, leftovers.

A server started here must never outlive the launcher (parent-death signal) and a
server left behind by a launcher that was SIGKILLed anyway must be found again
(`is_leftover`) without ever signalling an unrelated process that reused its pid.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path


class DevServicesError(Exception):
    """A server could not be prepared or started (message is user-facing)."""


def say(message: str) -> None:
    print(f"devservices: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def poll_until(predicate, timeout: float) -> bool:
    """Call ``predicate`` until it returns true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.1)


def make_preexec(death_signal: int):
    """Return a ``preexec_fn`` giving the child a parent-death signal (Linux).

    Runs in the child after any uid/gid switch done by subprocess (a
    credential change would otherwise clear the setting). Returns None where
    unsupported.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(death_signal), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl()
            os._exit(1)

    return preexec


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _pid_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _pid_command(pid: int) -> str:
    """Best-effort command line of ``pid`` ('' if unknown)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", "command="],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def is_leftover(pid: int, program: str, workdir: Path) -> bool:
    """Whether ``pid`` is a live ``program`` process working in ``workdir``.

    Both postgres and redis-server chdir into their data directory, which on
    Linux identifies them exactly; elsewhere the program name has to do.
    """
    if not pid_alive(pid):
        return False
    cwd = _pid_cwd(pid)
    if cwd is not None:
        with contextlib.suppress(OSError):
            return cwd.resolve() == workdir.resolve()
    return program in _pid_command(pid)


def stop_pid(pid: int, steps: list[tuple[int, float]]) -> None:
    """Send each (signal, grace period) in turn until ``pid`` is gone."""
    for sig, grace in steps:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if poll_until(lambda: not pid_alive(pid), grace):
            return


def stop_child(proc: subprocess.Popen, steps: list[tuple[int, float]]) -> None:
    """Like :func:`stop_pid` for our own child (reaps it)."""
    for sig, grace in steps:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            return
    proc.wait()


def clean_env() -> dict[str, str]:
    """Environment for server processes: without libpq ``PG*`` variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}
