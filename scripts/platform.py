#!/usr/bin/env python
"""Run the platform's processes: `web`, `worker`, or `all` (what `make run` runs).

    python scripts/platform.py web      # ASGI server, WEB_CONCURRENCY processes (default 2 per core) on PORT
    python scripts/platform.py worker   # Celery worker (+ beat unless WORKER_BEAT=0) + event-queue consumers
    python scripts/platform.py all      # migrate, then web + worker; Ctrl-C/SIGTERM stops both
    python scripts/platform.py demo     # `all` plus a demo fleet (manage.py run_demo) playing against it
    python scripts/platform.py manage ARGS...   # manage.py with the same environment (make manage)

`worker` and `all` supervise their children (scripts/supervisor.py): one that exits is
restarted on its own with backoff, the others untouched; a crash-looping one stops the
platform with exit status 1. `web` alone is uvicorn itself, which restarts its workers.

Database and Redis come from DATABASE_URL / REDIS_URL (`make` starts embedded
servers when they are unset, see scripts/devservices.py).
"""

import os
import secrets
import shutil
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
    ]


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


def worker_commands() -> dict[str, list[str]]:
    """The Celery worker plus EVENT_BUS_WORKER_COUNT event-queue consumer processes (one loop each)."""
    consumer = [sys.executable, str(REPO_ROOT / "manage.py"), "run_event_consumers"]
    return {"worker": worker_argv(), **{f"events-{n}": consumer for n in range(1, event_consumer_count() + 1)}}


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
        '  API token: make manage ARGS="create_api_token <username>"\n',
        flush=True,
    )
    children = {"web": web_argv(), **worker_commands()}
    if mode == "demo":
        print("  Demo fleet: 300 simulated devices, alert rules, a staged rollout in 30 s\n", flush=True)
        demo = [sys.executable, str(REPO_ROOT / "manage.py"), "run_demo", "--base-url", f"http://127.0.0.1:{port}"]
        children["demo"] = demo
    return _run_children(children)


if __name__ == "__main__":
    sys.exit(main())
