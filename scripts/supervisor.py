"""Keep the platform's long-running processes up, as systemd or supervisord would (used by scripts/platform.py).

Before, one child exiting made the runner stop all the others: SIGKILL one event consumer and web,
Celery and the other consumer went down with it. Now a child that exits while the platform is not
stopping is logged and started again on its own; the other children are not touched.

* **Backoff**: the first restart waits `delay` (0.5 s), each further one twice as long as the one
  before, up to `max_delay` (15 s). A child that stayed up `reset_after` seconds (30) before it
  exited starts again from `delay`: it was working, this is a new fault, not the same crash loop.
* **Crash loop**: a child that would need more than `limit` restarts (5) within `window` seconds
  (60) is given up on: "giving up on <name>" is logged, every other child is stopped and the runner
  exits with status 1, so whatever runs the platform (systemd, Docker, Kubernetes, a terminal) sees
  the failure instead of a platform silently missing a part. With the defaults a child that dies at
  once is given up after about 16 s (waits of 0.5 + 1 + 2 + 4 + 8 s).
* **Leftovers**: each child runs in its own process group (what a systemd unit's cgroup is for),
  and when its main process dies everything left in the group is SIGKILLed before the restart.
  Measured: a SIGKILLed Celery main process leaves its embedded beat process running, still
  scheduling, so without this a restart would run two beats.
* **Stop**: SIGTERM or SIGINT to the runner sends SIGTERM to each child's main process (Celery and
  uvicorn stop their own workers), waits up to `stop_timeout` (20 s) for all of them, then SIGKILLs
  whatever is left in their groups; a second signal (Ctrl-C twice) does that at once. The exit
  status is 0. Ctrl-C at a terminal reaches only the runner (the children are in other process
  groups), so each child gets exactly one SIGTERM. On Linux the children also get SIGTERM if the
  runner itself is killed (a parent-death signal), so a SIGKILLed runner leaves nothing behind.

The loop polls every `POLL_SECONDS`: a child's exit is noticed within 0.1 s, at no measurable CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

POLL_SECONDS = 0.1

# Environment variable -> RestartPolicy field (documented in .env.example).
POLICY_ENV = {
    "PLATFORM_RESTART_DELAY_SECONDS": "delay",
    "PLATFORM_RESTART_MAX_DELAY_SECONDS": "max_delay",
    "PLATFORM_RESTART_RESET_SECONDS": "reset_after",
    "PLATFORM_RESTART_LIMIT": "limit",
    "PLATFORM_RESTART_WINDOW_SECONDS": "window",
    "PLATFORM_STOP_TIMEOUT_SECONDS": "stop_timeout",
}


@dataclass(frozen=True)
class RestartPolicy:
    delay: float = 0.5
    max_delay: float = 15.0
    reset_after: float = 30.0
    limit: int = 5
    window: float = 60.0
    stop_timeout: float = 20.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RestartPolicy:
        defaults, values = cls(), {}
        for variable, name in POLICY_ENV.items():
            raw = environ.get(variable, "").strip()
            if raw:
                try:
                    values[name] = type(getattr(defaults, name))(raw)  # int for `limit`, else float
                except ValueError:
                    raise ValueError(f"{variable}={raw!r} is not a number") from None
        return cls(**values)

    def next_delay(self, previous: float | None, uptime: float) -> float:
        """The wait before restarting a child that was up `uptime` seconds; `previous` is the wait before its
        current run (None for the first run)."""
        if previous is None or uptime >= self.reset_after:
            return self.delay
        return min(previous * 2, self.max_delay)


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    delay: float | None = None  # the wait before the current run (None: first run, or reset)
    restart_at: float | None = None
    restarts: deque[float] = field(default_factory=deque)  # when it exited and was rescheduled, within the window
    starts: list[float] = field(default_factory=list)  # monotonic start times (for logs and tests)
    delays: list[float] = field(default_factory=list)  # every wait used, in order


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that gives the child SIGTERM when the runner dies (Linux), else None.

    Strictly, when the thread that started it ends: the runner starts children from its main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before prctl()
            os._exit(1)

    return preexec


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _log(message: str) -> None:
    print(f"platform: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Run `commands` ({name: argv}) until `request_stop()` (or a crash loop); see the module docstring."""

    def __init__(
        self,
        commands: Mapping[str, list[str]],
        *,
        policy: RestartPolicy | None = None,
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.children = {name: Child(name=name, argv=list(argv)) for name, argv in commands.items()}
        self.policy = policy or RestartPolicy()
        self.cwd, self.env, self.log = cwd, env, log
        self._stopping = self._hurry = False
        self._preexec = _parent_death_signal()

    def request_stop(self) -> None:
        """Stop every child and return from `run()`; a second call (a second Ctrl-C) SIGKILLs them at once.

        Safe to call from a signal handler or another thread: it only sets flags.
        """
        self._hurry = self._stopping
        self._stopping = True

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, frame: self.request_stop())

    def pids(self) -> dict[str, int | None]:
        return {name: child.process.pid if child.process else None for name, child in self.children.items()}

    def run(self) -> int:
        """0 after a requested stop; 1 after giving up on a child."""
        exit_code = 0
        for child in self.children.values():
            self._start(child)
        while not self._stopping:
            now = time.monotonic()
            for child in self.children.values():
                if child.process is not None:
                    code = child.process.poll()
                    if code is not None and not self._schedule_restart(child, code, now):
                        exit_code = 1
                        self._stopping = True
                        break
                elif child.restart_at is not None and now >= child.restart_at and not self._stopping:
                    self._start(child)
            time.sleep(POLL_SECONDS)
        self._stop_all()
        return exit_code

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(
            child.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,  # its own process group: a terminal read would stop it (SIGTTIN)
            process_group=0,
            preexec_fn=self._preexec,
        )
        child.started_at = time.monotonic()
        child.starts.append(child.started_at)
        child.restart_at = None

    def _schedule_restart(self, child: Child, code: int, now: float) -> bool:
        """Plan the restart of an exited child; False when it is crash-looping (give up)."""
        pid = child.process.pid
        _kill_group(pid)  # whatever it left behind (pool processes, beat) goes with it
        child.process = None
        uptime = now - child.started_at
        policy = self.policy
        while child.restarts and now - child.restarts[0] > policy.window:
            child.restarts.popleft()
        if len(child.restarts) >= policy.limit:
            self.log(
                f"giving up on {child.name}: it exited with {describe_exit(code)} after {uptime:.1f}s up, "
                f"and was restarted {len(child.restarts)} times within {policy.window:g}s; stopping the platform"
            )
            return False
        child.delay = policy.next_delay(child.delay, uptime)
        child.delays.append(child.delay)
        child.restart_at = now + child.delay
        child.restarts.append(now)
        self.log(
            f"{child.name} (pid {pid}) exited with {describe_exit(code)} after {uptime:.1f}s up; "
            f"restarting it in {child.delay:g}s (restart {len(child.restarts)} of at most {policy.limit} "
            f"within {policy.window:g}s)"
        )
        return True

    def _stop_all(self) -> None:
        running = {name: child.process for name, child in self.children.items() if child.process is not None}
        for process in running.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.policy.stop_timeout
        while not self._hurry and time.monotonic() < deadline and any(p.poll() is None for p in running.values()):
            time.sleep(POLL_SECONDS)
        for name, process in running.items():
            if process.poll() is None:
                self.log(f"{name} (pid {process.pid}) still running; killing it")
            _kill_group(process.pid)  # the straggler itself, and anything its group still holds
            process.wait()
