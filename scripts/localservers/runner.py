"""Start the servers CMD needs, run CMD, forward signals, stop the servers again."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

from .instance import InstanceBusy, InstanceLock, read_urls, urls_file, write_urls
from .postgres import Postgres
from .processes import DevServicesError, make_preexec, say
from .redis_server import Redis

VAR_DIR = Path(__file__).resolve().parents[2] / "var"


class _Terminated(BaseException):
    """Raised from a signal handler while servers are being started/stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminal_signalled_our_group() -> bool:
    """Whether a SIGINT/SIGHUP we got was most likely sent by the terminal.

    True when we are in the terminal's foreground process group: the terminal
    then signalled the whole group, including the child.
    """
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _set_handlers(handler, ignored: set[int]) -> None:
    """Install ``handler`` for the handled signals that were not ignored at
    startup (e.g. SIGHUP under ``nohup``: that must stay ignored, also for CMD)."""
    for sig in _HANDLED_SIGNALS:
        if sig not in ignored:
            signal.signal(sig, handler)


def _raise_terminated(signum: int, _frame) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(signum)


def _quiet_signals() -> None:
    """While stopping servers, ignore further signals (stops are bounded)."""
    for sig in _HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _run_child(command: list[str], env: dict[str, str], ignored: set[int]) -> int:
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum: int, _frame) -> None:
        if child is None:
            pending.append(signum)  # arrived while spawning: deliver afterwards
        elif signum == signal.SIGTERM or not _terminal_signalled_our_group():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    _set_handlers(forward, ignored)
    try:
        child = subprocess.Popen(command, env=env, preexec_fn=make_preexec(signal.SIGTERM))
    except OSError as exc:
        say(f"cannot run {command[0]!r}: {exc.strerror or exc}")
        return 126 if isinstance(exc, PermissionError) else 127
    for signum in pending:
        child.send_signal(signum)
    return _exit_status(child.wait())


def run(instance: str, command: list[str]) -> int:
    need_pg = not os.environ.get("DATABASE_URL")
    need_redis = not os.environ.get("REDIS_URL")
    if not (need_pg or need_redis):
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            say(f"cannot run {command[0]!r}: {exc.strerror or exc}")
            return 126 if isinstance(exc, PermissionError) else 127

    # Until the child runs, SIGTERM/SIGHUP abort startup like Ctrl-C does, so
    # that whatever was started gets stopped again.
    ignored = {sig for sig in _HANDLED_SIGNALS if signal.getsignal(sig) == signal.SIG_IGN}
    _set_handlers(_raise_terminated, ignored)
    instance_dir = VAR_DIR / instance
    env = dict(os.environ)
    # ExitStack unwinds in reverse: stop redis, stop postgres, release lock.
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(InstanceLock(instance_dir))
            servers = []
            if need_pg:
                servers.append(("postgres", "DATABASE_URL", Postgres(instance_dir)))
            if need_redis:
                servers.append(("redis", "REDIS_URL", Redis(instance_dir)))
            for name, variable, server in servers:
                stack.callback(server.stop)
                server.start()
                env[variable] = server.url
                say(f"{name} at {server.url}")
            write_urls(instance_dir, {variable: env[variable] for _, variable, _ in servers})
            stack.callback(urls_file(instance_dir).unlink, missing_ok=True)
            return _run_child(command, env, ignored)
        except InstanceBusy as busy:
            # `make web` and `make worker` in two terminals: the second joins the
            # servers the first one started (it doesn't own or stop them).
            shared = read_urls(instance_dir)
            missing = [v for v, needed in (("DATABASE_URL", need_pg), ("REDIS_URL", need_redis)) if needed]
            if not all(shared.get(variable) for variable in missing):
                say(f"error: instance {instance!r} is in use by pid {busy.holder}; retry or use --instance")
                return 1
            for variable in missing:
                env[variable] = shared[variable]
            say(f"using the servers of launcher pid {busy.holder} ({', '.join(missing)})")
            return _run_child(command, env, ignored)
        except DevServicesError as exc:
            say(f"error: {exc}")
            return 1
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except _Terminated as exc:
            return 128 + exc.signum
        finally:
            _quiet_signals()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devservices.py",
        description="Run CMD with embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are set.",
    )
    parser.add_argument(
        "--instance",
        default="dev",
        help="name of the server set; data lives in var/<instance>/ (default: dev)",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run_parser = sub.add_parser("run", help="run CMD with the servers' URLs in its environment")
    run_parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        parser.error("run: missing CMD (usage: run -- CMD [ARGS...])")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", args.instance):
        parser.error("--instance: use letters, digits, '_', '.', '-' (not starting with '.' or '-')")
    return run(args.instance, command)
