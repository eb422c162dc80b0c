#!/usr/bin/env python
"""The ingestion targets of issue 12 as ratios to ceilings measured in the same run (`make bench`).

    make bench                                   # embedded Postgres/Redis when DATABASE_URL/REDIS_URL are unset
    python bench/suite.py                        # DATABASE_URL/REDIS_URL set: uses those servers
    python bench/suite.py --smoke                # every measure for ~1 s: checks that it runs (tests/)
    python bench/suite.py --profile-dir docs/perf --profile-tag before   # py-spy profiles, see docs/perf/

One run starts what `make run` starts (uvicorn with WEB_CONCURRENCY=4 processes, the Celery
worker and the event consumers) on a fresh database, with the rate limits and queue thresholds
raised out of the way (`_harness.UNLIMITED_ENV`), and beside it the FastAPI + asyncpg yardstick
(`bench/yardstick/app.py`, 4 uvicorn workers, same Postgres and Redis). `wrk` (a C load
generator, 2 threads; its CPU share is printed for every row) drives both with the Lua scripts in
`bench/wrk/` (every request a new point or serial). Each figure is divided by a ceiling measured
in the same run on the same machine, so the machine's speed and its other load mostly cancel:
`GET /health/live` (a plain Django view through the whole middleware stack), binary `COPY` into
`telemetry_point` from one connection, and the yardstick. The fast measures run in `--rounds`
rounds, ours and the yardstick alternating, and ratios are paired by round (median). Before each
measure the event queue is drained, so no measure pays for the previous one's events.

What each row measures: docs/perf/README.md.
"""

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ
import httpx
import orjson
import psutil
import psycopg
import redis
from _harness import UNLIMITED_ENV, api_token, fresh_database, running_platform
from _loadgen import encode_request, run_load

from iot.testing.processes import free_port, platform_env, psycopg_conninfo

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WRK_DIR = BENCH_DIR / "wrk"
WRK_THREADS = 2


# --- wrk ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One wrk run and what every process group spent meanwhile."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors
    wall_s: float
    cpu_s: dict[str, float]  # process group -> CPU seconds (user + system) during the run

    @property
    def ok(self) -> int:
        return max(self.requests - self.errors, 0)

    def cores(self, group: str) -> float:
        return self.cpu_s.get(group, 0.0) / self.wall_s

    def cpu_ms_per_request(self, group: str) -> float:
        return self.cpu_s.get(group, 0.0) * 1000 / max(self.requests, 1)

    def system_cpu_ms_per_request(self, server: str = "web") -> float:
        """CPU per request of everything it makes busy: `server`, worker + consumers, Postgres, Redis."""
        return sum(self.cpu_ms_per_request(g) for g in (server, "worker+consumers", "postgres", "redis"))


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def wrk(url: str, *, connections: int, seconds: float, script: str | None, env: dict, groups) -> Load:
    argv = [
        "wrk",
        "-t",
        str(min(WRK_THREADS, connections)),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    if script:
        argv += ["-s", str(WRK_DIR / script)]
    before = groups.cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run([*argv, url], capture_output=True, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - started
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = groups.cpu_seconds()
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    text = out.stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", text, re.MULTILINE))
    requests = re.search(r"(\d+) requests in", text)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not (requests and rate and set(percentiles) == {"50", "99"}):
        raise RuntimeError(f"unexpected wrk output:\n{text}\n{out.stderr}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    cpu = {name: max(after[name] - before.get(name, 0.0), 0.0) for name in after}
    cpu["wrk"] = (after_children.ru_utime + after_children.ru_stime) - (children.ru_utime + children.ru_stime)
    return Load(
        rps=float(rate.group(1)),
        p50_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
        requests=int(requests.group(1)),
        errors=errors,
        wall_s=wall,
        cpu_s=cpu,
    )


@dataclass(frozen=True)
class QueueKeys:
    stream: str
    depth: str
    dead: str


# --- processes -----------------------------------------------------------------------------------------


def _tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class ProcessGroups:
    """CPU time and memory of every process that takes part: the groups printed per measure."""

    web_pid: int
    worker_pid: int
    yardstick_pid: int
    postgres_pid: int | None
    redis_pid: int | None
    members: dict[str, list[psutil.Process]] = field(default_factory=dict)

    def _groups(self) -> dict[str, list[psutil.Process]]:
        groups = {
            "web": _tree(self.web_pid),
            "worker+consumers": _tree(self.worker_pid),
            "yardstick": _tree(self.yardstick_pid),
            "postgres": _tree(self.postgres_pid),
            "redis": _tree(self.redis_pid),
        }
        if self.postgres_pid is None:  # not ours to find by tree: every postgres process on the machine
            groups["postgres"] = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
        return groups

    def cpu_seconds(self) -> dict[str, float]:
        totals = {}
        for name, members in self._groups().items():
            total = 0.0
            for process in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = process.cpu_times()
                    total += times.user + times.system
            totals[name] = total
        return totals

    def web_workers(self) -> list[psutil.Process]:
        """uvicorn's worker processes (not its supervisor, nor multiprocessing's resource tracker)."""
        workers = []
        for process in _tree(self.web_pid)[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                if "resource_tracker" not in " ".join(process.cmdline()):
                    workers.append(process)
        return workers

    def web_rss(self) -> int:
        """Resident memory of the web server's worker processes."""
        total = 0
        for process in self.web_workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total


def _postgres_pid(conninfo: dict) -> int | None:
    with contextlib.suppress(Exception), psycopg.connect(**conninfo, autocommit=True) as conn:
        (directory,) = conn.execute("SHOW data_directory").fetchone()
        return int((Path(directory) / "postmaster.pid").read_text().split()[0])
    return None


def _redis_pid(client: redis.Redis) -> int | None:
    with contextlib.suppress(Exception):
        return int(client.info("server")["process_id"])
    return None


@contextlib.contextmanager
def yardstick(
    *, database: str, queue: QueueKeys, prefix: str, workers: int, pool_max: int
) -> Iterator[tuple[str, subprocess.Popen]]:
    """The FastAPI + asyncpg yardstick on a free port, `workers` uvicorn processes; yields (base URL, process)."""
    config = environ.Env.db_url_config(database)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_KEY_PREFIX": prefix,
        "YARDSTICK_STREAM_KEY": queue.stream,
        "YARDSTICK_DEPTH_KEY": queue.depth,
        "YARDSTICK_PG_HOST": config.get("HOST") or "127.0.0.1",
        "YARDSTICK_PG_PORT": str(config.get("PORT") or 5432),
        "YARDSTICK_PG_USER": config.get("USER") or "postgres",
        "YARDSTICK_PG_PASSWORD": config.get("PASSWORD") or "",
        "YARDSTICK_PG_DB": config["NAME"],
        "YARDSTICK_PG_POOL_MAX": str(pool_max),
        "YARDSTICK_RATE_LIMIT_PER_DEVICE": UNLIMITED_ENV["RATE_LIMIT_TELEMETRY_PER_DEVICE"],
        "YARDSTICK_RATE_LIMIT_GLOBAL": UNLIMITED_ENV["RATE_LIMIT_GLOBAL_PER_SECOND"],
        "YARDSTICK_QUEUE_THRESHOLD": UNLIMITED_ENV["BACKPRESSURE_QUEUE_THRESHOLD"],
        "YARDSTICK_QUEUE_MAX": UNLIMITED_ENV["EVENT_QUEUE_MAX_SIZE"],
    }
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "app:app",
        "--app-dir",
        str(BENCH_DIR / "yardstick"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"yardstick exited:\n{log.read()[-3000:].decode(errors='replace')}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/health/live", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("yardstick not live after 60 s")
                time.sleep(0.1)
            yield base_url, process
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# --- set-up and ceilings --------------------------------------------------------------------------------


def register_devices(base_url: str, token: str, count: int) -> list[str]:
    target = urlsplit(base_url)
    requests = [
        encode_request(
            "POST",
            "/devices",
            host=target.netloc,
            token_header=f"Token {token}",
            body={"serial_number": f"SN-SUITE-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1"},
        )
        for _ in range(count)
    ]
    results, _ = run_load(host=target.hostname, port=target.port, requests=iter(requests), connections=16)
    statuses = {r.status for r in results}
    if statuses != {201}:
        raise RuntimeError(f"device registration answered {statuses}: {results[0].body[:300]!r}")
    return [orjson.loads(r.body)["id"] for r in results]


@dataclass(frozen=True)
class Copy:
    rows_per_s: float
    postgres_us_per_row: float
    client_us_per_row: float  # this process, writing the rows

    def quiet_rows_per_s(self) -> float:
        """One connection on an idle machine: the client and its backend work in parallel, so the busier
        of the two sets the pace."""
        return 1e6 / max(self.postgres_us_per_row, self.client_us_per_row)


def copy_rows(conninfo: dict, device_ids: list[str], rows: int, groups: "ProcessGroups") -> Copy:
    """Binary COPY of `rows` points into telemetry_point from one connection, committed."""
    devices = [uuid.UUID(d) for d in device_ids]
    base = datetime.now(UTC) - timedelta(minutes=30)
    # Every row its own timestamp (made before the clock starts): a point is identified by device, metric and
    # timestamp (the unique index of telemetry migration 0003), so a repeated one would fail the COPY.
    stamps = [base + timedelta(microseconds=i) for i in range(rows)]
    metrics = ["m0", "m1", "m2", "m3"]
    with psycopg.connect(**conninfo) as conn:
        postgres_before, client_before = groups.cpu_seconds()["postgres"], time.process_time()
        started = time.perf_counter()
        with conn.cursor() as cursor:
            statement = "COPY telemetry_point (device_id, metric, ts, value) FROM STDIN (FORMAT BINARY)"
            with cursor.copy(statement) as copy:
                copy.set_types(["uuid", "varchar", "timestamptz", "float8"])
                for i in range(rows):
                    copy.write_row((devices[i % len(devices)], metrics[i % 4], stamps[i], float(i)))
        conn.commit()
        wall = time.perf_counter() - started
        postgres, client = groups.cpu_seconds()["postgres"] - postgres_before, time.process_time() - client_before
    return Copy(
        rows_per_s=rows / wall, postgres_us_per_row=postgres * 1e6 / rows, client_us_per_row=client * 1e6 / rows
    )


_QUEUE_KEYS = """
import django, orjson
django.setup()
from iot import event_queue
print(orjson.dumps([event_queue._stream_key(), event_queue._depth_key(), event_queue._dead_key()]).decode())
"""


def queue_keys(database: str, prefix: str) -> QueueKeys:
    """The event queue's key names as the platform's own code names them under `prefix` (asked, not
    rebuilt here: they change with the code, e.g. Redis Cluster hash tags)."""
    env = platform_env(
        database=database,
        extra={
            "DJANGO_SETTINGS_MODULE": "iot.settings",
            "REDIS_KEY_PREFIX": prefix,
            "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "bench-only-secret-key"),
        },
    )
    out = subprocess.run(
        [sys.executable, "-c", _QUEUE_KEYS], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    return QueueKeys(*orjson.loads(out.stdout.strip().splitlines()[-1]))


def redis_prefix_clear(client: redis.Redis, prefix: str) -> None:
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"
    page = []
    for key in client.scan_iter(match=pattern, count=1000):
        page.append(key)
        if len(page) == 1000:
            client.unlink(*page)
            page = []
    if page:
        client.unlink(*page)


def drain(client: redis.Redis, keys: QueueKeys, *, timeout: float) -> float:
    """Wait (polling, with a deadline) for the event queue to be empty; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if int(client.get(keys.depth) or 0) <= 0:
            break
        time.sleep(0.2)
    return time.monotonic() - started


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class Config:
    smoke: bool
    seconds: float
    warmup_seconds: float
    rounds: int
    web_concurrency: int
    yardstick_workers: int
    yardstick_pool_max: int
    devices: int
    copy_rows: int
    fill_points: int  # the memory row's second snapshot: points accepted in all
    fill_max_seconds: float
    drain_timeout: float
    server_env: dict[str, str]


def config_from(args) -> Config:
    env = {**UNLIMITED_ENV, "LOG_LEVEL": "WARNING"}
    if args.smoke:
        # Seconds, not figures: 2 web processes with small pools, so that a shared test Postgres keeps
        # connections to spare while the suite's own test platform runs too.
        env.update({"WEB_THREADS": "4", "DB_POOL_MAX_SIZE": "6", "EVENT_BUS_WORKER_COUNT": "1"})
        return Config(
            smoke=True,
            seconds=1,
            warmup_seconds=0,
            rounds=1,
            web_concurrency=2,
            yardstick_workers=2,
            yardstick_pool_max=4,
            devices=20,
            copy_rows=10_000,
            fill_points=0,
            fill_max_seconds=1,
            drain_timeout=1,
            server_env=env,
        )
    return Config(
        smoke=False,
        seconds=args.seconds,
        warmup_seconds=3,
        rounds=args.rounds,
        web_concurrency=args.web_concurrency,
        yardstick_workers=args.web_concurrency,
        yardstick_pool_max=16,  # as many as one of our processes has request threads (WEB_THREADS)
        devices=args.devices,
        copy_rows=args.copy_rows,
        fill_points=args.fill_points,
        fill_max_seconds=args.fill_max_seconds,
        drain_timeout=120,
        server_env=env,
    )


@dataclass
class Results:
    health: list[Load] = field(default_factory=list)
    point: list[Load] = field(default_factory=list)
    yard_point: list[Load] = field(default_factory=list)
    point_4: Load | None = None
    yard_point_4: Load | None = None
    register: Load | None = None
    batch_100: Load | None = None
    batch_1000: Load | None = None
    copies: list[Copy] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (points our server accepted so far, web RSS)
    shared_serial_devices: int = -1
    load_average: list[tuple[float, float, float]] = field(default_factory=list)
    drained_s: float = 0.0
    dead_letters: int = 0  # events the consumers refused (the yardstick's too): should stay 0


class Suite:
    def __init__(self, config: Config, *, base_url: str, yard_url: str, token: str, devices: list[str], **kw):
        self.config = config
        self.base_url = base_url
        self.yard_url = yard_url
        self.token = token
        self.devices = devices
        self.groups: ProcessGroups = kw["groups"]
        self.redis: redis.Redis = kw["redis_client"]
        self.queue: QueueKeys = kw["queue"]
        self.conninfo: dict = kw["conninfo"]
        self.results = Results()
        self.points_accepted = 0  # by our server, over the whole run (the memory row counts these)

    def env(self, **extra: str) -> dict[str, str]:
        # A new base second per run: no two runs share a timestamp. 20 minutes back: well inside the
        # accepted window, never in the future.
        return {
            "BENCH_TOKEN": self.token,
            "BENCH_DEVICES": ",".join(self.devices),
            "BENCH_BASE_EPOCH": str(int(time.time()) - 1200),
            **extra,
        }

    def load(self, url: str, *, connections: int, script: str | None, seconds: float | None = None, **env) -> Load:
        self.results.drained_s += drain(self.redis, self.queue, timeout=self.config.drain_timeout)
        figures = wrk(
            url,
            connections=connections,
            seconds=seconds or self.config.seconds,
            script=script,
            env=self.env(**env),
            groups=self.groups,
        )
        return figures

    def ours(self, path: str, **kw) -> Load:
        figures = self.load(self.base_url + path, **kw)
        if path.startswith("/telemetry/"):
            size = int(kw.get("BENCH_BATCH_SIZE", "1"))
            self.points_accepted += figures.ok * size
            self.results.rss.append((self.points_accepted, self.groups.web_rss()))
        return figures

    def log(self, label: str, figures: Load, unit: int = 1) -> None:
        print(
            f"  {label:<44} {figures.rps * unit:>9,.0f}/s  p50 {figures.p50_ms:7.2f} ms  p99 {figures.p99_ms:7.2f} ms"
            f"  errors {figures.errors}  wrk {figures.cores('wrk'):.2f} cores",
            flush=True,
        )

    def run(self) -> Results:
        c, r = self.config, self.results
        r.load_average.append(os.getloadavg())
        if c.warmup_seconds:
            # Every workload the measures run, once: each one's first run raises a process's peak memory by
            # 2-4 MiB for good (its code paths, its buffer sizes), which would read as growth with the points.
            print("warm-up (imports, pools, caches, every workload once) ...", flush=True)
            w = c.warmup_seconds
            self.ours("/health/live", connections=64, script=None, seconds=w)
            self.ours("/telemetry/point", connections=64, script="point.lua", seconds=w)
            self.load(self.yard_url + "/telemetry/point", connections=64, script="point.lua", seconds=w)
            self.ours("/devices", connections=64, script="register.lua", seconds=w, BENCH_TAG=uuid.uuid4().hex[:12])
            self.ours("/telemetry/batch", connections=64, script="batch.lua", seconds=w, BENCH_BATCH_SIZE="100")
            self.ours("/telemetry/batch", connections=16, script="batch.lua", seconds=w, BENCH_BATCH_SIZE="1000")

        r.copies.append(copy_rows(self.conninfo, self.devices, c.copy_rows, self.groups))
        print(f"  binary COPY, one connection: {r.copies[-1].rows_per_s:,.0f} rows/s", flush=True)

        for round_number in range(c.rounds):
            print(f"round {round_number + 1}/{c.rounds}", flush=True)
            r.health.append(self.ours("/health/live", connections=64, script=None))
            self.log("GET /health/live, 64 connections", r.health[-1])
            pair = [
                ("ours", lambda: self.ours("/telemetry/point", connections=64, script="point.lua")),
                ("yard", lambda: self.load(self.yard_url + "/telemetry/point", connections=64, script="point.lua")),
            ]
            for name, measure in pair if round_number % 2 == 0 else pair[::-1]:
                figures = measure()
                (r.point if name == "ours" else r.yard_point).append(figures)
                label = "POST /telemetry/point" if name == "ours" else "yardstick POST /telemetry/point"
                self.log(f"{label}, 64 connections", figures)

        r.point_4 = self.ours("/telemetry/point", connections=4, script="point.lua")
        self.log("POST /telemetry/point, 4 connections", r.point_4)
        r.yard_point_4 = self.load(self.yard_url + "/telemetry/point", connections=4, script="point.lua")
        self.log("yardstick POST /telemetry/point, 4 connections", r.yard_point_4)

        tag = uuid.uuid4().hex[:12]
        r.register = self.ours("/devices", connections=64, script="register.lua", BENCH_TAG=tag)
        self.log("POST /devices (half one serial), 64 connections", r.register)
        with psycopg.connect(**self.conninfo) as conn:
            (r.shared_serial_devices,) = conn.execute(
                "SELECT count(*) FROM devices_device WHERE serial_number = %s", [f"SN-SHARED-{tag}"]
            ).fetchone()

        r.batch_100 = self.ours("/telemetry/batch", connections=64, script="batch.lua", BENCH_BATCH_SIZE="100")
        self.log("100-point batches, 64 connections (points)", r.batch_100, 100)
        r.batch_1000 = self.ours("/telemetry/batch", connections=16, script="batch.lua", BENCH_BATCH_SIZE="1000")
        self.log("1000-point batches, 16 connections (points)", r.batch_1000, 1000)

        r.drained_s += drain(self.redis, self.queue, timeout=c.drain_timeout)
        r.copies.append(copy_rows(self.conninfo, self.devices, c.copy_rows, self.groups))
        print(f"  binary COPY, one connection: {r.copies[-1].rows_per_s:,.0f} rows/s", flush=True)
        self.fill()  # last: nothing waits for the consumers to catch up with its events
        r.load_average.append(os.getloadavg())
        r.dead_letters = int(self.redis.xlen(self.queue.dead))
        return r

    def fill(self) -> None:
        """1000-point batches until our server has accepted `fill_points` in all (the memory row)."""
        c = self.config
        rate = max(self.results.batch_1000.rps * 1000, 1000.0)
        started = time.monotonic()
        first = True
        while first or (self.points_accepted < c.fill_points and time.monotonic() - started < c.fill_max_seconds):
            first = False
            remaining = max(c.fill_points - self.points_accepted, 0)
            seconds = min(60.0, max(1.0, remaining / rate * 1.05), max(1.0, c.fill_max_seconds))
            self.ours("/telemetry/batch", connections=16, script="batch.lua", seconds=seconds, BENCH_BATCH_SIZE="1000")
            print(f"  filled to {self.points_accepted:,} points (web RSS {self.results.rss[-1][1] / 2**20:.1f} MB)")


# --- the table ------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _paired(a: list[Load], b: list[Load]) -> float:
    return _median([x.rps / y.rps for x, y in zip(a, b, strict=False) if y.rps])


def _figures(load: Load | list[Load], unit: int = 1) -> tuple[str, str, str, str, str]:
    loads = load if isinstance(load, list) else [load]
    rps = _median([f.rps for f in loads])
    points = f"{rps * unit:,.0f}" if unit > 1 else ""
    return (
        f"{rps:,.0f}",
        points,
        f"{_median([f.p50_ms for f in loads]):.1f}",
        f"{_median([f.p99_ms for f in loads]):.1f}",
        f"{_median([f.cores('wrk') for f in loads]):.2f}",
    )


def table(r: Results) -> str:
    """The issue's rows, each with two ratios: of req/s (the targets' definition), and of CPU.

    The CPU ratio divides the CPU time per unit of work of every server-side process (web or
    yardstick, worker + consumers, Postgres, Redis): what the req/s ratio would be on a quiet machine
    where everything is CPU-bound. On a machine shared with other work the req/s ratio partly measures
    which processes the scheduler favoured; the CPU ratio hardly moves. For the COPY rows the quiet
    machine is modelled: our batches use every CPU, a one-connection COPY goes at the pace of the
    busier of its client and its backend (`Copy.quiet_rows_per_s`)."""
    copy = max(r.copies, key=lambda c: c.rows_per_s)  # the ceiling: the best COPY (the first may meet a cold cache)
    health_rps = _median([f.rps for f in r.health])
    health_cpu = _median([f.system_cpu_ms_per_request() for f in r.health])
    rows = []

    def row(measure, loads, unit, ratio, cpu_ratio, target, threshold, server="web"):
        loads = loads if isinstance(loads, list) else [loads]
        met = f"{'yes' if ratio >= threshold else 'NO'} / {'yes' if cpu_ratio >= threshold else 'NO'}"
        cpu = f"{_median([f.cpu_ms_per_request(server) for f in loads]):.2f}"
        total = f"{_median([f.system_cpu_ms_per_request(server) for f in loads]):.2f}"
        rows.append([measure, *_figures(loads, unit), f"{ratio:.2f}", f"{cpu_ratio:.2f}", target, met, cpu, total])

    def paired_cpu(ours: list[Load], ceiling: list[Load], server: str = "web") -> float:
        pairs = zip(ours, ceiling, strict=False)
        return _median([c.system_cpu_ms_per_request(server) / o.system_cpu_ms_per_request() for o, c in pairs])

    health_cpu_ms = f"{_median([f.cpu_ms_per_request('web') for f in r.health]):.2f}"
    rows.append(
        [
            "GET /health/live, 64 conns (ceiling)",
            *_figures(r.health),
            "-",
            "-",
            "-",
            "",
            health_cpu_ms,
            f"{health_cpu:.2f}",
        ]
    )
    row(
        "single points, 64 conns ÷ /health/live",
        r.point,
        1,
        _paired(r.point, r.health),
        paired_cpu(r.point, r.health),
        ">= 0.25",
        0.25,
    )
    for load, size, target, threshold in ((r.batch_100, 100, ">= 0.2", 0.2), (r.batch_1000, 1000, ">= 0.5", 0.5)):
        connections = 64 if size == 100 else 16
        row(
            f"{size}-point batches, {connections} conns ÷ COPY",
            load,
            size,
            load.rps * size / copy.rows_per_s,
            psutil.cpu_count() * 1000 * size / load.system_cpu_ms_per_request() / copy.quiet_rows_per_s(),
            target,
            threshold,
        )
    p99 = r.point_4.p99_ms
    rows.append(
        [
            "single point, 4 conns: p99",
            *_figures(r.point_4),
            f"{p99:.1f} ms",
            "-",
            "< 10 ms",
            "yes" if p99 < 10 else "NO",
            f"{r.point_4.cpu_ms_per_request('web'):.2f}",
            f"{r.point_4.system_cpu_ms_per_request():.2f}",
        ]
    )
    row(
        "registrations (half one serial), 64 conns ÷ /health/live",
        r.register,
        1,
        r.register.rps / health_rps,
        health_cpu / r.register.system_cpu_ms_per_request(),
        ">= 0.2",
        0.2,
    )
    row(
        "single points ÷ FastAPI + asyncpg, 64 conns",
        r.point,
        1,
        _paired(r.point, r.yard_point),
        paired_cpu(r.point, r.yard_point, "yardstick"),
        ">= 1.0",
        1.0,
    )
    base = next(((n, rss) for n, rss in r.rss if n >= 100_000), r.rss[0])
    end = r.rss[-1]
    growth = (end[1] - base[1]) / base[1] if base[1] else float("nan")
    rows.append(
        [
            f"web RSS growth, {base[0]:,} -> {end[0]:,} points",
            f"{base[1] / 2**20:.0f} -> {end[1] / 2**20:.0f} MB",
            "",
            "",
            "",
            "",
            f"{growth:+.1%}",
            "-",
            "unchanged (< +5%)",
            "yes" if growth < 0.05 else "NO",
            "",
            "",
        ]
    )
    copies = " / ".join(f"{c.rows_per_s:,.0f}" for c in r.copies)
    rows.append(
        [
            f"reference: binary COPY rows/s, 1 conn (runs: {copies})",
            f"{copy.rows_per_s:,.0f}",
            "",
            "",
            "",
            "",
            "-",
            "-",
            "-",
            "",
            "",
            f"postgres {copy.postgres_us_per_row:.2f} + client {copy.client_us_per_row:.2f} us/row",
        ]
    )
    for loads, connections in ((r.yard_point, 64), ([r.yard_point_4], 4)):
        rows.append(
            [
                f"reference: FastAPI + asyncpg single points, {connections} conns",
                *_figures(loads),
                "-",
                "-",
                "-",
                "",
                f"{_median([f.cpu_ms_per_request('yardstick') for f in loads]):.2f}",
                f"{_median([f.system_cpu_ms_per_request('yardstick') for f in loads]):.2f}",
            ]
        )

    header = [
        "measure",
        "req/s",
        "points/s",
        "p50 ms",
        "p99 ms",
        "wrk cores",
        "ratio req/s",
        "ratio CPU",
        "target",
        "met (req/s / CPU)",
        "server CPU ms/req",
        "all CPU ms/req",
    ]
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(cells)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def cpu_table(r: Results) -> str:
    """Cores each process group kept busy during each measure (medians over rounds)."""
    measures = [
        ("GET /health/live, 64", r.health),
        ("single points, 64", r.point),
        ("yardstick single points, 64", r.yard_point),
        ("single point, 4", [r.point_4]),
        ("registrations, 64", [r.register]),
        ("100-point batches, 64", [r.batch_100]),
        ("1000-point batches, 16", [r.batch_1000]),
    ]
    groups = ["web", "yardstick", "worker+consumers", "postgres", "redis", "wrk"]
    lines = [f"  {'cores busy during':<30}" + "".join(f"{g:>18}" for g in groups)]
    for label, loads in measures:
        lines.append(f"  {label:<30}" + "".join(f"{_median([f.cores(g) for f in loads]):>18.2f}" for g in groups))
    return "\n".join(lines)


# --- profiles --------------------------------------------------------------------------------------------


def profile_summary(raw: str, *, command: str, title: str, top: int = 40) -> str:
    """The top frames of a py-spy `--format raw` profile by self and by total samples, as text."""
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for frame in set(frames):
            total_counts[frame] = total_counts.get(frame, 0) + n

    def ranked(counts: dict[str, int]) -> list[str]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [f"{n * 100 / max(samples, 1):6.2f}%  {n:6d}  {frame}" for frame, n in best]

    return "\n".join(
        [
            f"# {title}",
            f"# command: {command}",
            f"# {samples} samples of the thread holding the GIL; frames are `function (file)`; % of all samples",
            "",
            f"## top {top} by self time (the frame itself was running)",
            *ranked(self_counts),
            "",
            f"## top {top} by total time (the frame was on the stack)",
            *ranked(total_counts),
            "",
        ]
    )


def _busiest(processes: list[psutil.Process], *, over: float = 1.0) -> tuple[int, list[float]]:
    """The process that used the most CPU over the next `over` seconds, and every one's cores meanwhile."""
    if not processes:
        raise RuntimeError("no web worker or event consumer process found to profile")
    before = [sum(p.cpu_times()[:2]) for p in processes]
    time.sleep(over)
    cores = [(sum(p.cpu_times()[:2]) - b) / over for p, b in zip(processes, before, strict=True)]
    return processes[cores.index(max(cores))].pid, cores


def profile(suite: Suite, *, out_dir: Path, tag: str, seconds: int) -> None:
    """py-spy on one web worker and one event consumer under single-point load (64 connections).

    Each is the busiest of its kind once the load runs (wrk's keep-alive connections are spread over
    the web workers when they connect, not necessarily evenly: the workers' shares are printed).
    `--gil`: only the thread holding the GIL is sampled, so the profile is where the process's Python
    CPU goes (its default mode, every thread it does not judge idle, counted request threads blocked
    on their queue or on a socket here); by function (`--nolineno`).
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    consumers = [p for p in _tree(suite.groups.worker_pid) if "run_event_consumers" in " ".join(p.cmdline())]
    out: dict[str, Load] = {}
    loader = threading.Thread(
        target=lambda: out.setdefault(
            "load", suite.ours("/telemetry/point", connections=64, script="point.lua", seconds=seconds + 8)
        )
    )
    loader.start()
    time.sleep(3)
    web_pid, web_cores = _busiest(suite.groups.web_workers())
    consumer_pid, consumer_cores = _busiest(consumers)
    targets = {"web": web_pid, "consumer": consumer_pid}
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="iot-profile-"))
    recorders = {}
    commands = {}
    for name, pid in targets.items():
        argv = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100", "--nolineno", "--gil"]
        argv += ["--format", "raw", "--output", str(scratch / f"{name}.txt")]
        commands[name] = " ".join(["py-spy", *argv[1:-2], "--output", f"{name}.txt"])
        recorders[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for name, recorder in recorders.items():
        _, stderr = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0:
            raise RuntimeError(f"py-spy ({name}) failed: {stderr.decode(errors='replace')[-2000:]}")
    loader.join()
    load = out["load"]
    suite.log("profiled: POST /telemetry/point, 64 connections", load)
    load_line = (
        f"under: wrk -t2 -c64 -d{seconds + 8}s -s bench/wrk/point.lua (POST /telemetry/point, a new point per "
        f"request), {load.rps:,.0f} req/s, p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms; "
        f"WEB_CONCURRENCY={suite.config.web_concurrency}, cores of each web worker "
        f"{', '.join(f'{c:.2f}' for c in web_cores)}, of each consumer {', '.join(f'{c:.2f}' for c in consumer_cores)} "
        f"(the busiest is profiled); load average {os.getloadavg()[0]:.2f} on {psutil.cpu_count()} CPUs"
    )
    titles = {"web": "one web worker process (uvicorn + iot.asgi_bridge + Django)", "consumer": "one event consumer"}
    for name in targets:
        raw = (scratch / f"{name}.txt").read_text()
        text = profile_summary(raw, command=f"{commands[name]}  ({load_line})", title=f"{tag}: {titles[name]}")
        path = out_dir / f"{tag}-{name}.txt"
        path.write_text(text)
        print(f"  wrote {path}")
    shutil.rmtree(scratch, ignore_errors=True)


# --- main -----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every measure for ~1 s: checks it runs, not figures")
    parser.add_argument("--seconds", type=float, default=10, help="seconds per measure")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the /health/live, ours, yardstick triple")
    parser.add_argument("--web-concurrency", type=int, default=4)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--copy-rows", type=int, default=300_000)
    parser.add_argument("--fill-points", type=int, default=1_000_000, help="points in all for the memory row")
    parser.add_argument("--fill-max-seconds", type=float, default=600)
    parser.add_argument("--database", default="iot_bench_suite", help="name of the (recreated) database")
    parser.add_argument("--redis-prefix", default="iotbench-suite")
    parser.add_argument("--label", default="", help="printed above the table (e.g. which commit)")
    parser.add_argument("--profile-dir", type=Path, help="write py-spy profiles there instead of the table")
    parser.add_argument("--profile-tag", default="profile")
    parser.add_argument("--profile-seconds", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk (the Debian package)", file=sys.stderr)
        return 2
    config = config_from(args)
    started = time.monotonic()

    database = fresh_database(args.database)
    conninfo = psycopg_conninfo(environ.Env.db_url_config(database))
    token = api_token(database)
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    redis_prefix_clear(client, args.redis_prefix)
    queue = queue_keys(database, args.redis_prefix)
    env = {**config.server_env, "REDIS_KEY_PREFIX": args.redis_prefix}
    try:
        with (
            running_platform(database, workers=config.web_concurrency, extra_env=env, with_worker=True) as platform,
            yardstick(
                database=database,
                queue=queue,
                prefix=args.redis_prefix,
                workers=config.yardstick_workers,
                pool_max=config.yardstick_pool_max,
            ) as (yard_url, yard_process),
        ):
            web_pid, worker_pid = (p.process.pid for p in platform.processes[:2])
            groups = ProcessGroups(
                web_pid=web_pid,
                worker_pid=worker_pid,
                yardstick_pid=yard_process.pid,
                postgres_pid=_postgres_pid(conninfo),
                redis_pid=_redis_pid(client),
            )
            devices = register_devices(platform.base_url, token, config.devices)
            suite = Suite(
                config,
                base_url=platform.base_url,
                yard_url=yard_url,
                token=token,
                devices=devices,
                groups=groups,
                redis_client=client,
                queue=queue,
                conninfo=conninfo,
            )
            wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
            print(
                f"ingestion suite{' (SMOKE: seconds per measure, figures not meaningful)' if config.smoke else ''}"
                f"{': ' + args.label if args.label else ''}\n"
                f"  {psutil.cpu_count()} CPUs; WEB_CONCURRENCY={config.web_concurrency} (+ Celery worker, event "
                f"consumers); yardstick: FastAPI + asyncpg, {config.yardstick_workers} uvicorn workers; "
                f"{' '.join(wrk_version)}, {WRK_THREADS} threads; {config.seconds:g} s per measure, "
                f"{config.rounds} rounds; {len(devices)} devices; set up in {time.monotonic() - started:.0f} s",
                flush=True,
            )
            if args.profile_dir:
                if config.warmup_seconds:
                    suite.ours("/telemetry/point", connections=64, script="point.lua", seconds=5)
                profile(
                    suite,
                    out_dir=args.profile_dir,
                    tag=args.profile_tag,
                    seconds=args.profile_seconds,
                )
                return 0
            results = suite.run()
    finally:
        redis_prefix_clear(client, args.redis_prefix)

    loads = ", ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in results.load_average)
    print(
        f"\nload average (1/5/15 min) at start, end: {loads} on {psutil.cpu_count()} CPUs; "
        f"{results.drained_s:.0f} s spent draining the event queue between measures; "
        f"devices for the shared serial: {results.shared_serial_devices}; dead-lettered events: "
        f"{results.dead_letters}; run took {time.monotonic() - started:.0f} s"
    )
    print("ratios of the fast measures are medians of per-round pairs; wrk cores = the client's CPU share\n")
    print(table(results))
    step = max(len(results.rss) // 12, 1)
    trajectory = ", ".join(f"{n:,}: {rss / 2**20:.0f}" for n, rss in [*results.rss[:-1:step], results.rss[-1]])
    print(f"\nweb RSS (MB, {config.web_concurrency} processes) by points our server had accepted: {trajectory}")
    print()
    print(cpu_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
