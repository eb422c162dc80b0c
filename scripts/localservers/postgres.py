"""An embedded PostgreSQL cluster from the binaries in the ``pgserver`` wheel.

pgserver is not imported (its import has side effects): only its bundled
binaries are used. The server listens only on a unix socket in its data
directory, so it can never collide with a system PostgreSQL on 5432; see
scripts/devservices.py for the URL form django-environ needs for that.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from .processes import DevServicesError, clean_env, is_leftover, make_preexec, poll_until, stop_child, stop_pid, tail
from .rootaccount import make_traversable, make_tree_readable, root_account

PG_DATABASE = "iot"
PG_SUPERUSER = "postgres"
# Only used to name the unix socket (<dir>/.s.PGSQL.5432); no TCP listener.
PG_PORT = 5432
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

# Longest unix socket path we rely on (sun_path is 108 bytes on Linux and
# 104 on macOS, including the terminating NUL).
MAX_SOCKET_PATH = 100


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
        self.account = root_account()
        self.proc: subprocess.Popen | None = None
        self.socket_dir = self._socket_dir()

    # -- public API ---------------------------------------------------------

    @property
    def url(self) -> str:
        # "postgres://user@:port/" + "/socket/dir" + "/dbname": see scripts/devservices.py.
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
            stop_child(
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
        env = clean_env()
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
        make_tree_readable(self.install)
        make_tree_readable(self.install.parent.parent / "pgserver.libs")
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        make_traversable(self.pgdata)

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
            if is_leftover(pid, "postgres", self.pgdata):
                # An orphaned server for this very cluster (e.g. on a platform
                # without parent-death signals): shut it down cleanly, then
                # start our own so that its lifetime is tied to ours.
                stop_pid(pid, [(signal.SIGINT, PG_STOP_TIMEOUT), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)])
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
            make_traversable(self.socket_dir)

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
                    preexec_fn=make_preexec(signal.SIGINT),  # fast shutdown if we die
                    **self._as_account(),
                )
            if poll_until(self._ready, PG_START_TIMEOUT):
                return
            running = self.proc.poll() is None
            self.stop()
            if running or attempt == attempts:
                raise DevServicesError(
                    f"PostgreSQL did not {'become ready' if running else 'start'}; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
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
            env=clean_env(),
            timeout=60,
        )
        if result.returncode != 0:
            raise DevServicesError(f"psql {sql!r} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_database(self) -> None:
        if self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'") != "1":
            self._psql(f'CREATE DATABASE "{PG_DATABASE}"')
