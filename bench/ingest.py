#!/usr/bin/env python
"""Telemetry ingestion throughput, latency, the COPY ceiling and server memory.

    python bench/ingest.py                         # starts the platform on a fresh database
    python bench/ingest.py --url http://127.0.0.1:8000 --token KEY   # against a running one
    python bench/ingest.py --batch-points 200000 --single 5000       # a quicker run

Without `--url` it starts exactly what `make web` + `make worker` start (uvicorn
with --workers processes, Celery, the event consumers) on a fresh database, with
rate limits and backpressure thresholds raised by environment so that only the
platform's own speed is measured; with `--url` the server's limits are its own.

Phases, all against the same partitioned table:

(a) sustained batch ingestion: 100-point batches (--batch-size) from many devices over many
    keep-alive connections; points/s, requests/s, p50/p99;
(b) single-point ingestion: requests/s, p50/p99;
(c) the ceiling: raw `COPY` into telemetry_point from this process, and the same
    multi-row INSERT ... unnest the API uses, straight from one connection;
(d) memory: the web server processes' RSS after the first 100 000 points and
    after all of them (1 000 000 by default).

For every phase it prints where the CPU went (web processes, worker/consumer
processes, Postgres, Redis, this client), which says what limits the figure;
the client is a lean raw-socket HTTP/1.1 generator (bench/_loadgen.py).
"""

import argparse
import itertools
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import httpx
import orjson
import psutil
import psycopg
from _harness import api_token, fresh_database, percentile, running_platform
from _loadgen import encode_request, run_load

# Raised so that only the platform's speed is measured (the limits themselves are tested elsewhere).
BENCH_ENV = {
    "RATE_LIMIT_TELEMETRY_PER_DEVICE": "1000000000",
    "RATE_LIMIT_GLOBAL_PER_SECOND": "1000000000",
    "EVENT_QUEUE_MAX_SIZE": "1000000000",
    "BACKPRESSURE_QUEUE_THRESHOLD": "800000000",
    "BACKPRESSURE_REJECT_THRESHOLD": "950000000",
    "LOG_LEVEL": "WARNING",
}


# --- CPU accounting ------------------------------------------------------------------


@dataclass
class ProcessGroups:
    web_pid: int | None
    worker_pid: int | None

    def _members(self) -> dict[str, list[psutil.Process]]:
        # With --url the server's processes are not ours to find: only Postgres, Redis and the client are shown.
        groups: dict[str, list[psutil.Process]] = {}
        for root, name in ((self.web_pid, "web"), (self.worker_pid, "worker+consumers")):
            if root is not None:
                try:
                    parent = psutil.Process(root)
                    groups[name] = [parent, *parent.children(recursive=True)]
                except psutil.NoSuchProcess:
                    groups[name] = []
        groups["postgres"], groups["redis"] = [], []
        for process in psutil.process_iter(["name"]):
            if process.info["name"] in ("postgres", "postmaster"):
                groups["postgres"].append(process)
            elif process.info["name"] == "redis-server":
                groups["redis"].append(process)
        groups["client"] = [psutil.Process()]
        return groups

    def cpu_seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, members in self._members().items():
            total = 0.0
            for process in members:
                try:
                    times = process.cpu_times()
                    total += times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            totals[name] = total
        return totals

    def web_rss(self) -> int:
        if self.web_pid is None:
            return 0
        parent = psutil.Process(self.web_pid)
        return sum(child.memory_info().rss for child in parent.children(recursive=True))


def cpu_report(before: dict[str, float], after: dict[str, float], wall: float, requests: int) -> str:
    """Cores each group kept busy, and its CPU milliseconds per request."""
    # Postgres backends that ended during the phase are missing from `after`: floor at 0.
    used = {name: max(after.get(name, 0) - before.get(name, 0), 0) for name in after}
    cores = ", ".join(f"{name} {seconds / wall:.2f}" for name, seconds in used.items())
    per_request = ", ".join(f"{name} {seconds / max(requests, 1) * 1000:.2f}" for name, seconds in used.items())
    return f"CPU cores busy: {cores} (of {psutil.cpu_count()}); CPU ms per request: {per_request}"


# --- requests ---------------------------------------------------------------------------


def batch_requests(host: str, auth: str, device_ids: list[str], *, per_device: int, size: int) -> list[bytes]:
    """`per_device` distinct `size`-point batch requests per device, points 1 ms apart, all within the last hour."""
    base = datetime.now(UTC) - timedelta(minutes=50)
    requests = []
    for k in range(per_device):
        for n, device_id in enumerate(device_ids):
            start = base + timedelta(seconds=k * 7 + n * 0.001)
            points = [
                {"timestamp": (start + timedelta(milliseconds=i)).isoformat(), "metric": f"m{i % 4}", "value": i * 0.5}
                for i in range(size)
            ]
            requests.append(
                encode_request(
                    "POST",
                    "/telemetry/batch",
                    host=host,
                    token_header=auth,
                    body={"device_id": device_id, "points": points},
                )
            )
    return requests


def point_requests(host: str, auth: str, device_ids: list[str], *, count: int) -> list[bytes]:
    base = datetime.now(UTC) - timedelta(minutes=20)
    return [
        encode_request(
            "POST",
            "/telemetry/point",
            host=host,
            token_header=auth,
            body={
                "device_id": device_ids[i % len(device_ids)],
                "timestamp": (base + timedelta(microseconds=i)).isoformat(),
                "metric": "temperature",
                "value": 20.0 + i % 10,
            },
        )
        for i in range(count)
    ]


@dataclass
class PhaseResult:
    requests: int
    points: int
    wall: float
    latencies: list[float]
    statuses: dict[int, int]
    cpu: str

    def summary(self) -> str:
        ms = [v * 1000 for v in self.latencies]
        return (
            f"{self.points / self.wall:,.0f} points/s, {self.requests / self.wall:,.0f} req/s, "
            f"p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms "
            f"({self.requests} requests in {self.wall:.1f} s; statuses {self.statuses})"
        )


def run_phase(target, requests: list[bytes], *, total: int, points_each: int, connections: int, groups) -> PhaseResult:
    stream = itertools.islice(itertools.cycle(requests), total)
    before = groups.cpu_seconds()
    results, wall = run_load(host=target.hostname, port=target.port, requests=stream, connections=connections)
    after = groups.cpu_seconds()
    statuses: dict[int, int] = {}
    for result in results:
        statuses[result.status] = statuses.get(result.status, 0) + 1
    if statuses and set(statuses) != {202}:
        bad = next(r for r in results if r.status != 202)
        print(f"  !! unexpected answers {statuses}; e.g. {bad.status} {bad.body[:300]!r}")
    return PhaseResult(
        requests=len(results),
        points=statuses.get(202, 0) * points_each,
        wall=wall,
        latencies=[r.latency_s for r in results],
        statuses=dict(sorted(statuses.items())),
        cpu=cpu_report(before, after, wall, len(results)),
    )


# --- the ceiling ---------------------------------------------------------------------------


def copy_ceiling(database: str, device_ids: list[str], rows: int) -> tuple[float, float]:
    """Rows/s of COPY (binary) and of the API's INSERT ... unnest, both into telemetry_point, one connection."""
    device = uuid.UUID(device_ids[0])
    base = datetime.now(UTC) - timedelta(minutes=40)
    # Every row its own timestamp (made before the clock starts): a point is identified by device, metric and
    # timestamp (the unique index of telemetry migration 0003), so a repeated one would fail the statement.
    stamps = [base + timedelta(microseconds=i) for i in range(rows)]
    statements = max(rows // 100 // 5, 1)
    batches = [[base - timedelta(minutes=1, microseconds=100 * k + i) for i in range(100)] for k in range(statements)]
    with psycopg.connect(database) as conn:
        started = time.perf_counter()
        with conn.cursor() as cursor:
            with cursor.copy("COPY telemetry_point (device_id, metric, ts, value) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["uuid", "varchar", "timestamptz", "float8"])
                for i in range(rows):
                    copy.write_row((device, "copy", stamps[i], float(i)))
        conn.commit()
        copy_rate = rows / (time.perf_counter() - started)

        insert = (
            "INSERT INTO telemetry_point (device_id, metric, ts, value) "
            "SELECT d.id, p.metric, p.ts, p.value FROM devices_device AS d "
            "CROSS JOIN unnest(%s::varchar[], %s::timestamptz[], %s::float8[]) AS p (metric, ts, value) "
            "WHERE d.id = %s AND d.status <> 'decommissioned'"
        )
        metrics, values = ["unnest"] * 100, [float(i) for i in range(100)]
        started = time.perf_counter()
        with conn.cursor() as cursor:
            for batch in batches:
                cursor.execute(insert, [metrics, batch, values, device])
                conn.commit()
        insert_rate = statements * 100 / (time.perf_counter() - started)
    return copy_rate, insert_rate


# --- orchestration ------------------------------------------------------------------------


def register_devices(target, auth: str, count: int) -> list[str]:
    requests = [
        encode_request(
            "POST",
            "/devices",
            host=target.netloc,
            token_header=auth,
            body={"serial_number": f"SN-INGEST-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1"},
        )
        for _ in range(count)
    ]
    results, _ = run_load(host=target.hostname, port=target.port, requests=iter(requests), connections=32)
    assert all(r.status == 201 for r in results), {r.status for r in results}
    return [orjson.loads(r.body)["id"] for r in results]


def queue_depth(base_url: str) -> int:
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("iot_event_queue_depth "):
            return int(float(line.split()[1]))
    return -1


def metrics_rss(base_url: str) -> int:
    total = 0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("iot_process_resident_memory_bytes"):
            total += int(float(line.split()[-1]))
    return total


def bench(args, base_url: str, token: str, database: str | None, groups: ProcessGroups) -> None:
    target = urlparse(base_url)
    auth = f"Token {token}"
    host = target.netloc
    print(f"registering {args.devices} devices ...")
    device_ids = register_devices(target, auth, args.devices)
    size = args.batch_size
    batches = batch_requests(host, auth, device_ids, per_device=5, size=size)

    def rss() -> int:
        return groups.web_rss() if groups.web_pid else metrics_rss(base_url)

    print(f"(a) batch ingestion: {size}-point batches, {args.devices} devices, {args.connections} connections")
    warm_up = max(20_000 // size, 20)
    run_phase(target, batches, total=warm_up, points_each=size, connections=args.connections, groups=groups)
    first_requests = 100_000 // size
    first = run_phase(
        target, batches, total=first_requests, points_each=size, connections=args.connections, groups=groups
    )
    rss_100k = rss()
    rest_requests = max(args.batch_points // size - first_requests, 0)
    print(f"    first 100 000 points:        {first.summary()}")
    sent = first.points
    if rest_requests:
        sustained = run_phase(
            target, batches, total=rest_requests, points_each=size, connections=args.connections, groups=groups
        )
        sent += sustained.points
        print(f"    sustained, next {sustained.points:,} points: {sustained.summary()}")
        print(f"    {sustained.cpu}")
    else:
        print(f"    {first.cpu}")
    rss_end = rss()

    print(f"(b) single points: {args.single} requests, {args.single_connections} connections")
    singles = point_requests(host, auth, device_ids, count=args.single)
    run_phase(target, singles[:500], total=500, points_each=1, connections=args.single_connections, groups=groups)
    single = run_phase(
        target, singles, total=args.single, points_each=1, connections=args.single_connections, groups=groups
    )
    print(f"    {single.summary()}")
    print(f"    {single.cpu}")

    started = time.perf_counter()
    depth = queue_depth(base_url)
    while depth > 0 and time.perf_counter() - started < 600:
        time.sleep(0.5)
        depth = queue_depth(base_url)
    print(f"    event queue drained to {depth} {time.perf_counter() - started:.1f} s after the last request")

    if database:
        print(f"(c) ceiling, one connection from this process, {args.copy_rows:,} rows")
        copy_rate, insert_rate = copy_ceiling(
            database.replace("postgres://", "postgresql://", 1), device_ids, args.copy_rows
        )
        print(
            f"    COPY (binary): {copy_rate:,.0f} rows/s; "
            f"INSERT ... unnest (100 rows/statement): {insert_rate:,.0f} rows/s"
        )
    else:
        print("(c) ceiling: skipped (needs --database-url with --url)")

    print(
        f"(d) web server RSS: {rss_100k / 2**20:.1f} MB after the first 100 000 points, "
        f"{rss_end / 2**20:.1f} MB after {sent:,} (growth {(rss_end - rss_100k) / 2**20:+.1f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running platform (default: start one on a fresh database)")
    parser.add_argument("--token", help="operator API token for --url")
    parser.add_argument("--database-url", help="with --url: its DATABASE_URL, for the COPY ceiling")
    parser.add_argument("--workers", type=int, default=2, help="web server processes when starting one")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections for batches")
    parser.add_argument("--single-connections", type=int, default=64, help="concurrent connections for points")
    parser.add_argument("--batch-points", type=int, default=1_000_000, help="points sent in phase (a)")
    parser.add_argument("--batch-size", type=int, default=100, help="points per batch request")
    parser.add_argument("--single", type=int, default=20_000, help="single-point requests")
    parser.add_argument("--copy-rows", type=int, default=500_000)
    args = parser.parse_args()

    if args.url:
        if not args.token:
            parser.error("--url needs --token")
        bench(args, args.url.rstrip("/"), args.token, args.database_url, ProcessGroups(None, None))
        return
    database = fresh_database("iot_bench_ingest")
    token = api_token(database)
    # The server inherits this environment (WEB_THREADS, DB_POOL_MAX_SIZE, ... can be varied from outside).
    with running_platform(database, workers=args.workers, extra_env=BENCH_ENV, with_worker=True) as platform:
        web, worker = platform.processes[0].process.pid, platform.processes[1].process.pid
        print(f"platform: {args.workers} web processes, worker + event consumers; {psutil.cpu_count()} CPUs")
        bench(args, platform.base_url, token, database, ProcessGroups(web, worker))


if __name__ == "__main__":
    sys.exit(main())
