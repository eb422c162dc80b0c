#!/usr/bin/env python
"""What the unique point index and `ON CONFLICT DO NOTHING` cost the ingest statement.

    python bench/telemetry_dedup.py [--rows 1000000] [--statements 600] [--sizes 1,100,1000]

Migration 0003 made `(device_id, metric, ts DESC)` UNIQUE and the ingest INSERT skips a point
stored already (`telemetry.services._STORE_SQL`). This times, against real Postgres
(DATABASE_URL; a fresh database `iot_bench_dedup`), the ingest statement exactly as the service
sends it (binary arrays, the device join, the mark-seen CTE, the hooks' expressions), on two
partitioned tables of `--rows` points each (50 devices, 3 metrics, the last 7 days in daily
partitions), loaded alike:

* `before`: the statement as it was, a plain INSERT, into a table with the plain index;
* `unique, no ON CONFLICT`: the same plain INSERT into `telemetry_point` (unique index): what the
  index alone costs (not deployable: a duplicate would fail the statement);
* `after`: the statement as it is, `ON CONFLICT (device_id, metric, ts) DO NOTHING` and the
  columns that return the stored points when some were not, into `telemetry_point`;
* `after, all duplicates`: right after each `after`, the same points again (a retry): nothing
  inserted.

Per statement size (1 point, 100, 1000), the variants take turns statement by statement (so load
from other processes falls on all alike), each in its own transaction, committed; the figures are
medians of the statement's wall time (execute + fetch; BEGIN and COMMIT are the same for all and
left out) and this process's CPU for it (`time.process_time`: binding, sending, decoding). Every
new point has a timestamp no other uses, among the devices' recent points, as live traffic does.
"""

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _harness import in_process_django  # noqa: E402

PLAIN = "bench_point_plain"
DEVICES = 50
METRICS = ("bench", "m1", "m2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="points already in each table")
    parser.add_argument(
        "--statements", type=int, default=600, help="statements per variant of 1 point (n points: 10x fewer per 10n)"
    )
    parser.add_argument("--sizes", default="1,100,1000", help="points per statement")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    prefix = f"iotbench-dedup-{uuid.uuid4().hex[:6]}"
    database = in_process_django(database_name="iot_bench_dedup", redis_prefix=prefix)
    from django.db import connection

    import telemetry.services as services
    from devices.services import device_register
    from devices.sql import device_live_sql, device_mark_seen_sql
    from iot.testing.processes import psycopg_conninfo
    from telemetry.models import TABLE
    from telemetry.partitions import telemetry_partitions_list

    devices = [
        device_register(serial_number=f"DEDUP-{uuid.uuid4().hex}", device_type="s", firmware_version="1").device.pk
        for _ in range(DEVICES)
    ]

    # The plain table: the same columns, partitions and indexes as before migration 0003.
    days = sorted(telemetry_partitions_list())
    with connection.cursor() as cursor:
        like = "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY"
        cursor.execute(f"CREATE TABLE {PLAIN} (LIKE {TABLE} {like}) PARTITION BY RANGE (ts)")
        for day in days:
            cursor.execute(
                f"CREATE TABLE {PLAIN}_p{day:%Y%m%d} PARTITION OF {PLAIN} FOR VALUES FROM (%s) TO (%s)",
                [midnight(day), midnight(day + timedelta(days=1))],
            )
        cursor.execute(f"CREATE TABLE {PLAIN}_default PARTITION OF {PLAIN} DEFAULT")
        cursor.execute(f"CREATE INDEX ON {PLAIN} (device_id, metric, ts DESC)")
        cursor.execute(f"CREATE INDEX ON {PLAIN} USING brin (received_at)")
        # `--rows` points over the last 7 days (0.6 s apart at 1M), from whole seconds: the bench's own
        # timestamps (odd microseconds) never meet them.
        load = f"""
            INSERT INTO {{table}} (device_id, metric, ts, value)
            SELECT (%(devices)s::uuid[])[1 + g %% {DEVICES}], (%(metrics)s::varchar[])[1 + (g / {DEVICES}) %% 3],
                   date_trunc('second', now()) - interval '2 hours' - (g * 604800.0 / %(rows)s) * interval '1 second',
                   g
            FROM generate_series(1, %(rows)s) AS g
        """
        params = {"devices": devices, "metrics": list(METRICS), "rows": args.rows}
        started = time.perf_counter()
        for table in (TABLE, PLAIN):
            cursor.execute(load.format(table=table), params)
            cursor.execute(f"VACUUM ANALYZE {table}")
        print(f"loaded {args.rows} points into each table in {time.perf_counter() - started:.0f} s")

    hooks = services._points_stored_hooks
    extra = "".join(f", (SELECT {expression} FROM d)" for hook in hooks for expression in hook.sql.values())
    seen = device_mark_seen_sql(device_id_sql="(SELECT id FROM d)")

    def literal(sql: str) -> str:
        return sql.replace("{", "{{").replace("}", "}}")

    # The statement before migration 0003 (`git show <before>:telemetry/services.py`), into `{table}`.
    plain_sql = f"""
WITH d AS {{device}}, ins AS (
INSERT INTO {{table}} (device_id, metric, ts, value)
SELECT d.id, p.metric, p.ts, p.value
FROM d
CROSS JOIN unnest(%b::varchar[], %b::timestamptz[], %b::float8[]) AS p (metric, ts, value)
RETURNING 1), seen AS ({literal(seen)})
SELECT (SELECT count(*) FROM ins), (SELECT group_id FROM d), now(), (SELECT version FROM seen){literal(extra)}
"""
    # name -> (statement, whether it takes the stored-points columns' three parameters)
    variants = {
        "before": (plain_sql.replace("{table}", PLAIN), False),
        "unique, no ON CONFLICT": (plain_sql.replace("{table}", TABLE), False),
        "after": (services._store_statement(), True),
    }

    conn = psycopg.connect(**psycopg_conninfo(_db_config(database)))
    origin = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    counter = 0

    def new_points(size: int) -> tuple[uuid.UUID, list, list, list]:
        nonlocal counter
        device = devices[counter % DEVICES]
        stamps = [origin + timedelta(microseconds=1 + 2 * (counter + i)) for i in range(size)]
        counter += size
        return device, ["bench"] * size, stamps, [1.0] * size

    def run(name: str, batch) -> tuple[float, float, int]:
        sql, stored_columns = variants[name]
        device, metrics, stamps, values = batch
        device_sql, device_params = device_live_sql(device_id=device)
        params = [*device_params, metrics, stamps, values] + ([len(metrics)] * 3 if stored_columns else [])
        with conn.transaction(), conn.cursor() as cursor:
            wall, cpu = time.perf_counter(), time.process_time()
            cursor.execute(sql.format(device=device_sql), params)
            inserted = cursor.fetchone()[0]
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return wall * 1000, cpu * 1000, inserted

    names = list(variants)
    for size in sizes:
        count = args.statements if size == 1 else max(20, args.statements * 10 // size)
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in [*names, "after, all duplicates"]}
        for i in range(count + 10):  # the first 10: warm-up
            # The variants in turn, the order rotating, so that the machine's other load falls on all alike.
            for name in names[i % len(names) :] + names[: i % len(names)]:
                batch = new_points(size)
                wall, cpu, inserted = run(name, batch)
                assert inserted == size, (name, inserted)
                if i >= 10:
                    timings[name].append((wall, cpu))
                if name == "after":  # and at once its retry: every point stored already
                    wall, cpu, inserted = run(name, batch)
                    assert inserted == 0
                    if i >= 10:
                        timings["after, all duplicates"].append((wall, cpu))
        medians = {
            name: (statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows))
            for name, rows in timings.items()
        }
        print(f"\n{size} point(s) per statement, {count} statements per variant, medians:")
        for name, (wall, cpu) in medians.items():
            print(f"  {name:<24} {wall:7.3f} ms wall ({wall / size * 1000:6.1f} us/point)  {cpu:6.3f} ms client CPU")
        (bw, bc), (aw, ac) = medians["before"], medians["after"]
        print(
            f"  after/before: {aw / bw:.2f}x wall ({aw - bw:+.3f} ms, {(aw - bw) / size * 1000:+.1f} us/point), "
            f"{ac / bc:.2f}x client CPU ({ac - bc:+.3f} ms); "
            f"the unique index alone {medians['unique, no ON CONFLICT'][0] / bw:.2f}x; "
            f"a retry of all duplicates {medians['after, all duplicates'][0] / aw:.2f}x the fresh statement"
        )
    conn.close()
    from iot.testing.redis import redis_prefix_flush

    redis_prefix_flush(prefix)


def midnight(day) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


def _db_config(url: str) -> dict:
    import environ

    return environ.Env.db_url_config(url)


if __name__ == "__main__":
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    main()
