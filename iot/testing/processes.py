"""Start the platform's real processes (multi-worker ASGI server, Celery worker) for tests and benches.

Nothing here is a stand-in: it launches exactly what `make web` / `make worker`
launch, as subprocesses, and waits for them with a deadline.
"""

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url(settings_dict: dict) -> str:
    """A DATABASE_URL for the database Django is connected to (e.g. the test database)."""
    user = quote(settings_dict.get("USER") or "", safe="")
    password = quote(settings_dict.get("PASSWORD") or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or ""
    port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
    if host.startswith("/"):
        # A unix-socket directory: django-environ reads `postgres://user@:port//socket/dir/name`.
        return f"postgres://{credentials}{port}/{quote(host, safe='/')}/{settings_dict['NAME']}"
    return f"postgres://{credentials}{quote(host, safe='')}{port}/{settings_dict['NAME']}"


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful), then SIGKILL for the whole process group: nothing is left behind."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Children (uvicorn workers, Celery pool, consumers) share the session's group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()

    def kill(self) -> None:
        """Hard-kill the process and every descendant (a crash, for failure tests).

        The whole tree, not just the process group: the supervisor (`scripts/supervisor.py`)
        starts each child in a group of its own, and a child that only saw its supervisor die
        would shut down gracefully (Celery finishing its running tasks), which is not a crash.
        """
        try:
            tree = [psutil.Process(self.process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        psutil.wait_procs(tree[1:], timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Platform:
    """A running web server (and optionally workers) plus the environment they share."""

    env: dict[str, str]
    base_url: str = ""
    processes: list[ManagedProcess] = field(default_factory=list)

    @property
    def mqtt_url(self) -> str:
        """`mqtt://127.0.0.1:<port>` of its embedded broker (`start_mqtt_broker`); empty: MQTT is off."""
        return self.env.get("MQTT_URL", "")

    def stop(self) -> None:
        for managed in reversed(self.processes):
            managed.stop()


def platform_env(*, database: str, extra: dict[str, str] | None = None, mqtt: bool = False) -> dict[str, str]:
    """The environment of a platform's processes. Its MQTT secrets (the broker's MQTT_AUTH_SECRET, the bridge
    account's MQTT_BRIDGE_PASSWORD) are its own, made up here. With `mqtt`, MQTT_URL names a free port for the
    broker `start_mqtt_broker` starts; without, MQTT is off (MQTT_URL empty, whatever the caller's is)."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": database,
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "iot.settings_test"),
            "PYTHONUNBUFFERED": "1",
            "MQTT_AUTH_SECRET": secrets.token_urlsafe(24),
            "MQTT_BRIDGE_PASSWORD": secrets.token_urlsafe(24),
            "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}" if mqtt else "",
        }
    )
    env.update(extra or {})
    return env


def _spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> ManagedProcess:
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    process = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    log_file.close()
    return ManagedProcess(name=name, process=process, log_path=log_path)


def start_web(platform: Platform, *, workers: int = 2, log_dir: Path, timeout: float = 60.0) -> ManagedProcess:
    port = free_port()
    # Shared with the platform's workers started after it (as `make run` shares one), so that `/metrics`
    # shows what they count too (the MQTT bridge's messages, the points it ingested).
    platform.env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="iot-prom-", dir=log_dir)
    env = {**platform.env, "PORT": str(port), "WEB_CONCURRENCY": str(workers)}
    managed = _spawn("web", [sys.executable, str(REPO_ROOT / "scripts" / "platform.py"), "web"], env, log_dir)
    platform.processes.append(managed)
    platform.base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if managed.process.poll() is not None:
            raise RuntimeError(f"web server exited early:\n{managed.log_tail()}")
        try:
            if httpx.get(f"{platform.base_url}/health/live", timeout=1.0).status_code == 200:
                return managed
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"web server not live after {timeout}s:\n{managed.log_tail()}")


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def start_mqtt_broker(platform: Platform, *, log_dir: Path, timeout: float = 60.0) -> ManagedProcess:
    """The embedded MQTT broker (`python -m mqtt.broker`, what `make run` starts) on the port of the platform's
    MQTT_URL (`platform_env(mqtt=True)`), asking its running web server; returns once it accepts connections."""
    url = urlsplit(platform.mqtt_url)
    if not url.port or not platform.base_url:
        raise RuntimeError("start_mqtt_broker needs platform_env(mqtt=True) and a running web server (start_web)")
    argv = [sys.executable, "-m", "mqtt.broker", "--host", url.hostname, "--port", str(url.port)]
    managed = _spawn("mqtt-broker", [*argv, "--auth-url", f"{platform.base_url}/mqtt"], platform.env, log_dir)
    platform.processes.append(managed)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if managed.process.poll() is not None:
            raise RuntimeError(f"MQTT broker exited early:\n{managed.log_tail()}")
        if _accepts_connections(url.hostname, url.port):
            return managed
        time.sleep(0.1)
    raise RuntimeError(f"MQTT broker not listening after {timeout}s:\n{managed.log_tail()}")


# What the MQTT ingest bridge logs once it has subscribed (`mqtt.bridge.MqttBridge._on_connect`).
BRIDGE_SUBSCRIBED = r"MQTT bridge \S+ subscribed to "


def start_worker(platform: Platform, *, log_dir: Path, name: str = "worker", timeout: float = 60.0) -> ManagedProcess:
    """The worker (Celery, event consumers, and the MQTT bridge when the platform has a broker). With a broker,
    returns once the bridge has subscribed: a message published before that has no subscriber to queue for."""
    managed = _spawn(
        name, [sys.executable, str(REPO_ROOT / "scripts" / "platform.py"), "worker"], platform.env, log_dir
    )
    platform.processes.append(managed)
    if platform.mqtt_url:
        deadline = time.monotonic() + timeout
        while not re.search(BRIDGE_SUBSCRIBED, managed.log_tail(200_000)):
            if managed.process.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the worker's MQTT bridge did not subscribe within {timeout}s:\n{managed.log_tail()}"
                )
            time.sleep(0.1)
    return managed


def wait_until(predicate, *, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def psycopg_conninfo(settings_dict: dict) -> dict:
    """Keyword arguments for `psycopg.connect` to the database Django is configured for."""
    keys = {"HOST": "host", "PORT": "port", "USER": "user", "PASSWORD": "password", "NAME": "dbname"}
    return {arg: settings_dict[key] for key, arg in keys.items() if settings_dict.get(key)}


def http_client(platform: Platform, token: str | None = None, *, timeout: float = 60.0) -> httpx.Client:
    """A keep-alive client for a running platform, authenticated with an operator token if given.

    The pool is sized for the concurrency tests (up to a few hundred simultaneous requests).
    """
    return httpx.Client(
        base_url=platform.base_url,
        headers={"Authorization": f"Token {token}"} if token else {},
        timeout=timeout,
        limits=httpx.Limits(max_connections=250, max_keepalive_connections=250),
    )


def devservices_module():
    """`scripts/devservices.py` (not a package) loaded as a module: its Postgres and Redis
    launchers give a test servers of its own to stop, crash and restart."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("devservices", REPO_ROOT / "scripts" / "devservices.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_manage(env: dict[str, str], *args: str) -> str:
    """A management command in a child process with `env` (a live platform's database and
    Redis; a test's own transaction would hide its writes from the server); returns stdout."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "manage.py"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result.stdout
