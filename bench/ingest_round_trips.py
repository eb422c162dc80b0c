#!/usr/bin/env python
"""Round trips and CPU per accepted telemetry point, before and after issue 12, measured in-process.

    python bench/ingest_round_trips.py [--requests 600] [--rounds 3] [--batch-size 1]
    python bench/ingest_round_trips.py --consumer [--events 3000] [--rounds 5]

Issue 12: a single point cost ~13x what the framework itself costs, and a request thread
spent about half its wall time waiting on Redis and a quarter on Postgres. This compares,
one request at a time against real Postgres and Redis (DATABASE_URL / REDIS_URL):

* `before`: the ingest pipeline as it was (rebuilt here from the primitives that still
  exist): one GET for admission, one rate-limit script, then a transaction of
  BEGIN, the points' INSERT, `device_mark_seen`'s UPDATE and COMMIT, then the publish
  script after the commit (and, when the UPDATE changed the device row, its cache
  tombstone inside the transaction and again after the commit, each one round trip);
* `after`: `telemetry_points_ingest` as it is now: one script for admission, queue
  reservation and rate limit; BEGIN, one statement that inserts the points and
  updates the device's `last_seen`, COMMIT; after the commit, the publish (which
  consumes the reservation) and the device's after-commit tombstone in one pipelined
  round trip.

each for two kinds of device: `hot` (the same device every request, so `last_seen`
is less than a second old and the UPDATE changes nothing) and `fleet` (a different
device each request, silent for more than a second: the UPDATE bumps `last_seen` and
the device's cache entry is tombstoned: what most points of a real fleet cost), and
each through the service alone (`ingest`) and through the whole HTTP request with an
operator token (`http`: Django, DRF, auth from the token cache, validation). The alerts
hook is registered, as deployed (no rule for these devices).

With `--consumer`, the other side of the queue instead: the event consumers handling
"telemetry.points" events (one point each, 50 devices), `before` one at a time as they did (the
handler's live push and its counters' MULTI/EXEC, then an ack script call, per event) and
`after` a read's events together (`telemetry.events.telemetry_points_received_many`: the pushes
in one hop, the counters in one MULTI/EXEC, one ack call); rounds alternate, each `--events`
events published and then drained with reads of 100; Redis round trips include the Channels
layer's (its asyncio client).

Measured on 2 loaded cores (5 rounds of 500, medians), one point per request: the whole
HTTP request 1.28 -> 1.08 ms CPU (hot) and 1.63 -> 1.20 ms (fleet), wall -10% and -15%;
the service alone 0.62 -> 0.46 and 0.86 -> 0.57 ms CPU; round trips Redis 4 -> 3 and
6 -> 4 (with the token lookup), Postgres 4 -> 3. 100-point batches: HTTP 1.74 -> 1.47 and
2.09 -> 1.62 ms CPU per request. Consumers: 0.40 -> 0.12 ms CPU and 0.55 -> 0.15 ms wall per
event, Redis round trips 4 -> 2 per event.

It prints, per variant: wall time and this process's CPU per request (`time.process_time`;
the Postgres and Redis servers' own CPU is not in it) and per point, and Redis and
Postgres round trips per request. The variants are interleaved request by request (the
order rotating), so load from other processes falls on all of them alike; medians of
`--rounds` rounds. Round trips are counted apart from the timed runs: Redis calls by
patching redis-py (`iot.testing.redis.redis_round_trips`), Postgres round trips in a
child process that uses psycopg's pure-Python libpq wrapper, where each query sent
outside a pipeline and each pipeline sync is one round trip.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

DEVICES_PER_VARIANT = 4000


def _count_postgres_round_trips() -> list[int]:
    """Patch psycopg's pure-Python libpq wrapper: count queries sent outside a pipeline, and pipeline syncs."""
    from psycopg import pq
    from psycopg.pq import pq_ctypes

    count = [0]
    conn_class = pq_ctypes.PGconn
    for name in ("send_query", "send_query_params", "send_prepare", "send_query_prepared", "exec_", "exec_params"):
        original = getattr(conn_class, name)

        def counted(self, *args, __original=original, **kwargs):
            if self.pipeline_status == pq.PipelineStatus.OFF:
                count[0] += 1
            return __original(self, *args, **kwargs)

        setattr(conn_class, name, counted)
    original_sync = conn_class.pipeline_sync

    def counted_sync(self, *args, **kwargs):
        count[0] += 1
        return original_sync(self, *args, **kwargs)

    conn_class.pipeline_sync = counted_sync
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600, help="requests per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1, help="points per request (1: /telemetry/point)")
    parser.add_argument("--consumer", action="store_true", help="measure the event consumers instead")
    parser.add_argument("--events", type=int, default=3000, help="events per consumer round")
    parser.add_argument("--count-postgres", action="store_true", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--database", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    counting_postgres = args.count_postgres
    pg_count = _count_postgres_round_trips() if counting_postgres else None
    prefix = f"iotbench-rt-{uuid.uuid4().hex[:6]}"
    if args.database:
        os.environ.update(
            {
                "DATABASE_URL": args.database,
                "DJANGO_SETTINGS_MODULE": "iot.settings",
                "REDIS_KEY_PREFIX": prefix,
                "LOG_LEVEL": "WARNING",
            }
        )
        from _harness import UNLIMITED_ENV

        os.environ.update(UNLIMITED_ENV)
        os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key")
        import django

        django.setup()
        database = args.database
    else:
        from _harness import in_process_django

        database = in_process_django(database_name="iot_bench_ingest_round_trips", redis_prefix=prefix)

    from django.contrib.auth import get_user_model
    from django.db import DEFAULT_DB_ALIAS, connections, transaction
    from django.test import Client
    from rest_framework.authtoken.models import Token

    import telemetry.services as services
    from devices.selectors import device_status_get
    from devices.services import device_mark_seen, device_register
    from devices.sql import device_live_sql
    from iot.event_queue import EventQueueFull, event_queue_admission, event_queue_publish
    from iot.ratelimit import rate_limit_consume
    from iot.testing.redis import redis_prefix_flush, redis_round_trips
    from telemetry.metrics import count_points

    # --- the pipeline as it was before issue 12, from the primitives that still exist ---------------

    legacy_store_sql = f"""
WITH d AS {{device}}, ins AS ({services._INSERT_SQL.format(device="d")} RETURNING 1)
SELECT (SELECT count(*) FROM ins), (SELECT group_id FROM d), now(){{extra}}
"""

    def legacy_statement() -> str:
        extra = "".join(
            f", (SELECT {expression} FROM d)"
            for hook in services._points_stored_hooks
            for expression in hook.sql.values()
        )
        return legacy_store_sql.replace("{extra}", extra.replace("{", "{{").replace("}", "}}"))

    legacy_statements: list[str] = []  # built once, as the service did

    def legacy_insert(batch):
        if not legacy_statements:
            legacy_statements.append(legacy_statement())
        db = connections[DEFAULT_DB_ALIAS]
        with transaction.atomic(savepoint=False):
            db.ensure_connection()
            device_sql, device_params = device_live_sql(device_id=batch.device_id)
            with db.wrap_database_errors, psycopg.Cursor(db.connection) as cursor:
                cursor.execute(
                    legacy_statements[0].format(device=device_sql),
                    [*device_params, batch.metrics, batch.timestamps, batch.values],
                )
                inserted, group_id, received_at, *returned = cursor.fetchone()
            if inserted == len(batch):
                services._points_stored_hooks_run(points=batch, group_id=group_id, returned=returned)
                device_mark_seen(device_ids=[batch.device_id])
                return received_at, group_id
            status = device_status_get(device_id=batch.device_id)
        raise RuntimeError(f"device {batch.device_id}: {status}")

    def legacy_after_commit(batch, received_at, group_id):
        count_points(outcome="accepted", points=len(batch))
        try:
            event_queue_publish(
                event_type=services.EVENT_TYPE,
                payload=services._event_payload(batch=batch, received_at=received_at, group_id=group_id),
                weight=len(batch),
            )
        except EventQueueFull:
            pass

    def legacy_ingest(*, batch):
        points = len(batch)
        admission = event_queue_admission()
        if admission.state != "ok":
            raise services.TelemetryBackpressure(admission)
        decision = rate_limit_consume(device_id=str(batch.device_id), points=points)
        if not decision.allowed:
            raise services.TelemetryRateLimited(decision)
        received_at, group_id = legacy_insert(batch)
        transaction.on_commit(partial(legacy_after_commit, batch, received_at, group_id))
        return services.IngestResult(count=points, rate_limit=decision, stored=points)

    current_ingest = services._ingest

    if args.consumer:
        consumer_bench(args)
        redis_prefix_flush(prefix)
        return

    # --- devices, requests ----------------------------------------------------------------------------

    def register(n: int) -> list[uuid.UUID]:
        return [
            device_register(
                serial_number=f"BENCH-RT-{uuid.uuid4().hex}", device_type="s", firmware_version="1", group_id="bench"
            ).device.pk
            for _ in range(n)
        ]

    variants = [
        (pipeline, kind, layer)
        for kind in ("hot", "fleet")
        for layer in ("ingest", "http")
        for pipeline in ("before", "after")
    ]
    fleet_size = 50 if counting_postgres else DEVICES_PER_VARIANT
    fleets = {variant: register(fleet_size) for variant in variants if variant[1] == "fleet"}
    hot = {variant: register(1) for variant in variants if variant[1] == "hot"}
    devices = {**fleets, **hot}
    # Seen once already (status `active`), so a fleet device's UPDATE bumps `last_seen` only, as in a running fleet.
    device_mark_seen(device_ids=[device_id for pool in devices.values() for device_id in pool])
    turn = {variant: 0 for variant in variants}

    user, _ = get_user_model().objects.get_or_create(username="bench-rt")
    token, _ = Token.objects.get_or_create(user=user)
    client = Client(HTTP_AUTHORIZATION=f"Token {token.key}")
    path = "/telemetry/point" if args.batch_size == 1 else "/telemetry/batch"
    start = datetime.now(UTC) - timedelta(hours=1)
    counter = 0

    def next_device(variant) -> uuid.UUID:
        pool = devices[variant]
        turn[variant] += 1
        return pool[turn[variant] % len(pool)]

    def stamps() -> list[datetime]:
        nonlocal counter
        counter += 1
        return [start + timedelta(microseconds=counter * args.batch_size + i) for i in range(args.batch_size)]

    def prepare(variant):
        pipeline, _, layer = variant
        device_id = next_device(variant)
        ingest = legacy_ingest if pipeline == "before" else current_ingest
        ts = stamps()
        if layer == "http":
            if args.batch_size == 1:
                body = {"device_id": str(device_id), "timestamp": ts[0].isoformat(), "metric": "bench", "value": 1.0}
            else:
                points = [{"timestamp": t.isoformat(), "metric": "bench", "value": 1.0} for t in ts]
                body = {"device_id": str(device_id), "points": points}

            def run():
                services._ingest = ingest
                try:
                    response = client.post(path, body, content_type="application/json")
                finally:
                    services._ingest = current_ingest
                assert response.status_code == 202, response.content

            return run
        batch = services.PointColumns(
            device_id=device_id, metrics=["bench"] * len(ts), timestamps=ts, values=[1.0] * len(ts)
        )

        def run():
            services._ingest = ingest
            try:
                services.telemetry_points_ingest(batch=batch)
            finally:
                services._ingest = current_ingest

        return run

    def name(variant) -> str:
        pipeline, kind, layer = variant
        return f"{layer:<6} {kind:<5} {pipeline}"

    # --- round trips ---------------------------------------------------------------------------------

    def round_trips(samples: int) -> dict:
        counts = {}
        for variant in variants:
            redis_calls, postgres = [], []
            for _ in range(samples):
                call = prepare(variant)
                before_pg = pg_count[0] if pg_count else 0
                with redis_round_trips() as calls:
                    call()
                redis_calls.append(len(calls))
                postgres.append((pg_count[0] - before_pg) if pg_count else 0)
            counts[name(variant)] = (statistics.median(redis_calls), statistics.median(postgres))
        return counts

    if counting_postgres:
        time.sleep(1.1)  # every fleet device silent for more than a second
        for _ in range(2):  # warm: connections, token cache, rule versions
            round_trips(3)
        time.sleep(1.1)
        print(json.dumps(round_trips(9)))
        redis_prefix_flush(prefix)
        return

    child = subprocess.run(
        [sys.executable, __file__, "--count-postgres", "--database", database, "--batch-size", str(args.batch_size)],
        env={**os.environ, "PSYCOPG_IMPL": "python"},
        capture_output=True,
        text=True,
        check=True,
    )
    counts = json.loads(child.stdout.strip().splitlines()[-1])

    # --- CPU and wall ----------------------------------------------------------------------------------

    def measure(call) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        return time.perf_counter() - wall, time.process_time() - cpu

    def round_(requests: int) -> dict[str, tuple[float, float]]:
        totals = {variant: [0.0, 0.0] for variant in variants}
        for i in range(requests):
            for variant in variants[i % len(variants) :] + variants[: i % len(variants)]:
                wall, cpu = measure(prepare(variant))
                totals[variant][0] += wall
                totals[variant][1] += cpu
        return {name(v): (wall / requests * 1000, cpu / requests * 1000) for v, (wall, cpu) in totals.items()}

    round_(max(args.requests // 10, 20))  # warm-up: connections, caches, code paths
    results = [round_(args.requests) for _ in range(args.rounds)]
    median = {name(v): tuple(statistics.median(r[name(v)][k] for r in results) for k in (0, 1)) for v in variants}

    print(
        f"{args.batch_size} point(s) per request, {args.requests} requests per variant and round, "
        f"{args.rounds} rounds, medians; round trips per request (Redis / Postgres)"
    )
    for variant in variants:
        label = name(variant)
        wall, cpu = median[label]
        redis_trips, postgres_trips = counts[label]
        print(
            f"  {label:<20} {wall:7.3f} ms wall {cpu:7.3f} ms CPU per request, "
            f"{cpu / args.batch_size:7.3f} ms CPU per point; "
            f"round trips {redis_trips:g} Redis / {postgres_trips:g} Postgres"
        )
    for kind in ("hot", "fleet"):
        for layer in ("ingest", "http"):
            before, after = median[f"{layer:<6} {kind:<5} before"], median[f"{layer:<6} {kind:<5} after"]
            print(
                f"{layer} {kind}: after/before CPU {after[1] / before[1]:.2f} ({after[1] - before[1]:+.3f} ms), "
                f"wall {after[0] / before[0]:.2f} ({after[0] - before[0]:+.3f} ms)"
            )
    redis_prefix_flush(prefix)


def consumer_bench(args) -> None:
    """The event consumers, before and after (see the module docstring)."""
    import orjson
    import redis.asyncio

    import telemetry.services as services
    from iot import event_queue
    from iot.channel_layer import channel_group_send
    from iot.redis import get_redis
    from iot.testing.redis import redis_round_trips
    from telemetry import events
    from telemetry.redis_keys import live_group_name

    event_queue.load_event_handlers()
    event_queue.ensure_consumer_group()
    device_ids = [uuid.uuid4() for _ in range(50)]
    start = datetime.now(UTC) - timedelta(minutes=5)

    def publish(n: int) -> None:
        for i in range(n):
            batch = services.PointColumns(
                device_id=device_ids[i % len(device_ids)],
                metrics=["bench"],
                timestamps=[start + timedelta(microseconds=i)],
                values=[float(i)],
            )
            payload = services._event_payload(batch=batch, received_at=datetime.now(UTC), group_id="bench")
            event_queue.event_queue_publish(event_type=services.EVENT_TYPE, payload=payload, weight=1)

    def legacy_handler(payload: dict) -> None:
        received, message = events._parse(payload)
        channel_group_send(group=live_group_name(received.device_id), message=message)
        events.counters_add(
            device_id=received.device_id,
            group_id=received.group_id,
            received_at=received.received_at,
            latencies_ms=received.latencies_ms,
        )

    def legacy_consume() -> int:
        """What a consumer did per read before: handler, then an ack script call, per event."""
        response = get_redis().xreadgroup(
            event_queue.GROUP, "bench", {event_queue._stream_key(): ">"}, count=100, block=1
        )
        if not response:
            return 0
        for raw_id, fields in response[0][1]:
            legacy_handler(orjson.loads(fields[b"p"]))
            event_queue.event_queue_ack(ids=[raw_id.decode()])
        return len(response[0][1])

    def current_consume() -> int:
        return event_queue.event_queue_consume(consumer="bench", count=100, block_ms=1).handled

    def drain(consume) -> int:
        handled = 0
        while (done := consume()) > 0:
            handled += done
        return handled

    def counted_async():
        """Count the asyncio client's calls too (the Channels layer's)."""
        calls: list[str] = []
        command, execute = redis.asyncio.Redis.execute_command, redis.asyncio.client.Pipeline.execute

        async def counted_command(self, *a, **k):
            calls.append(str(a[0]))
            return await command(self, *a, **k)

        async def counted_execute(self, *a, **k):
            calls.append("pipeline")
            return await execute(self, *a, **k)

        redis.asyncio.Redis.execute_command = counted_command
        redis.asyncio.client.Pipeline.execute = counted_execute

        def restore():
            redis.asyncio.Redis.execute_command = command
            redis.asyncio.client.Pipeline.execute = execute

        return calls, restore

    variants = {"before": legacy_consume, "after": current_consume}
    trips = {}
    for name, consume in variants.items():
        publish(300)
        async_calls, restore = counted_async()
        try:
            with redis_round_trips() as calls:
                handled = drain(consume)
        finally:
            restore()
        assert handled == 300, handled
        trips[name] = (len(calls) + len(async_calls)) / handled

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    drain(current_consume)
    for round_number in range(args.rounds + 1):  # the first is a warm-up
        for name, consume in variants.items():
            publish(args.events)
            wall, cpu = time.perf_counter(), time.process_time()
            handled = drain(consume)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            assert handled == args.events, handled
            if round_number:
                results[name].append((wall / handled * 1000, cpu / handled * 1000))
    print(f"event consumers: {args.events} one-point events per round, reads of 100, {args.rounds} rounds, medians")
    median = {}
    for name in variants:
        wall = statistics.median(r[0] for r in results[name])
        cpu = statistics.median(r[1] for r in results[name])
        median[name] = (wall, cpu)
        print(
            f"  {name:<7} {wall:7.3f} ms wall {cpu:7.3f} ms CPU per event; "
            f"{trips[name]:.2f} Redis round trips per event"
        )
    print(
        f"after/before CPU {median['after'][1] / median['before'][1]:.2f}, "
        f"wall {median['after'][0] / median['before'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
