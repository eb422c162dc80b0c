#!/usr/bin/env python
"""The device liveness sweep at fleet scale, and what its index costs ingestion.

    python bench/device_liveness.py [--devices 100000] [--stale 1000] [--updates 5000] [--rounds 3]

Against real Postgres and Redis (DATABASE_URL / REDIS_URL), on a fresh database with
`--devices` active devices bulk-inserted (one `INSERT ... SELECT generate_series`), last
seen within the last 200 s. It prints:

* the plan (`EXPLAIN ANALYZE`, rolled back) and the time of the sweep's statement
  (`devices.services._MARK_INACTIVE_SQL`) when no device is stale, and when `--stale` are,
  without an index on `last_seen` (as deployed) and with a partial one, `device_active_last_seen`;
* `device_mark_inactive` end to end (the UPDATE and the pipelined tombstones) for `--stale`
  stale devices, and for the whole fleet gone silent at once (batches of LIVENESS_BATCH_SIZE);
* what the index costs `device_mark_seen` (every accepted telemetry request may run it, at most
  once a second per device): its UPDATE alone, `--updates` times on random devices, with and
  without the index, its WAL, and how many of those were HOT updates (an indexed `last_seen` rules
  HOT out: every index of the table gets a new entry);
* 1000 cache tombstones: one Redis call each, pipelined, and the multi-key script the sweep uses.

Rounds alternate the variants, so that load from other processes falls on both alike;
medians are reported.
"""

import argparse
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _harness import in_process_django  # noqa: E402

INDEX = "device_active_last_seen"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--stale", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=5000, help="mark-seen UPDATEs per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    prefix = f"iotbench-liveness-{uuid.uuid4().hex[:6]}"
    in_process_django(database_name="iot_bench_liveness", redis_prefix=prefix)
    from django.db import connection

    from devices import services
    from devices.cache import device_cache_key
    from devices.services import _MARK_INACTIVE_SQL, _MARK_SEEN_SQL, device_mark_inactive
    from iot.cache import _INVALIDATE, _tombstone_ttl_ms, versioned_cache_invalidate, versioned_cache_invalidate_many
    from iot.redis import get_redis
    from iot.testing.redis import redis_prefix_flush

    def pipelined(versions: dict[str, int], ttl: int) -> None:
        pipe = get_redis().pipeline(transaction=False)
        for key, version in versions.items():
            _INVALIDATE(keys=[key], args=[version, ttl], client=pipe)
        pipe.execute()

    def sql(statement: str, params=None):
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    def fleet_fresh() -> None:
        sql("UPDATE devices_device SET status = 'active', last_seen = now() - random() * interval '200 seconds'")
        sql("VACUUM ANALYZE devices_device")

    def make_stale(count: int) -> None:
        sql(
            "UPDATE devices_device SET last_seen = now() - interval '1 hour' "
            "WHERE id IN (SELECT id FROM devices_device ORDER BY random() LIMIT %s)",
            [count],
        )
        sql("ANALYZE devices_device")

    def explain(params: dict) -> tuple[float, list[str]]:
        """The sweep statement's plan and execution time (ms), rolled back."""
        sql("BEGIN")
        try:
            plan = [row[0] for row in sql("EXPLAIN (ANALYZE, BUFFERS) " + _MARK_INACTIVE_SQL, params)]
        finally:
            sql("ROLLBACK")
        execution = next(line for line in plan if line.startswith("Execution Time"))
        return float(execution.split()[2]), plan

    def index(present: bool) -> None:
        if present:
            sql(f"CREATE INDEX IF NOT EXISTS {INDEX} ON devices_device (last_seen) WHERE status = 'active'")
        else:
            sql(f"DROP INDEX IF EXISTS {INDEX}")
        sql("ANALYZE devices_device")

    try:
        t0 = time.perf_counter()
        sql(
            "INSERT INTO devices_device (id, serial_number, device_type, firmware_version, status, metadata, "
            "registered_at, updated_at, last_seen, version, token_hash) "
            "SELECT gen_random_uuid(), 'BENCH-' || n, 'sensor', '1.0.0', 'active', '{}', now(), now(), "
            "now() - random() * interval '200 seconds', 1, md5(n::text) || md5((n + 1)::text) "
            "FROM generate_series(1, %s) AS n",
            [args.devices],
        )
        fleet_fresh()
        print(f"{args.devices} devices inserted in {time.perf_counter() - t0:.1f} s")
        params = {"silent_seconds": 300, "limit": services.LIVENESS_BATCH_SIZE}

        for present in (True, False):
            index(present)
            label = "with the partial index" if present else "WITHOUT the index"
            fleet_fresh()
            none = [explain(params) for _ in range(args.rounds)]
            median = statistics.median(t for t, _ in none)
            print(f"\n--- sweep statement, {label}, no stale device: median {median:.2f} ms")
            print("\n".join(none[0][1]))
            make_stale(args.stale)
            some = [explain(params) for _ in range(args.rounds)]
            median = statistics.median(t for t, _ in some)
            print(f"\n--- sweep statement, {label}, {args.stale} stale: median {median:.2f} ms")
            print("\n".join(some[0][1]))

        index(True)
        print("\n--- device_mark_inactive end to end (UPDATE + pipelined tombstones + commit), with the index")
        for stale in (args.stale, args.devices):
            timings = []
            for _ in range(args.rounds):
                fleet_fresh()
                make_stale(stale)
                t0 = time.perf_counter()
                changed = device_mark_inactive(silent_seconds=300)
                timings.append((time.perf_counter() - t0) * 1000)
                assert changed == stale, (changed, stale)
            print(f"{stale} stale of {args.devices}: median {statistics.median(timings):.1f} ms")

        print(f"\n--- device_mark_seen's UPDATE alone, {args.updates} single-device updates per variant and round")
        print("(synchronous_commit off for these, so the commit's fsync does not drown the difference)")
        sql("SET synchronous_commit = off")
        ids = [row[0] for row in sql("SELECT id FROM devices_device")]
        results: dict[bool, list[float]] = {True: [], False: []}
        hot: dict[bool, list[float]] = {True: [], False: []}
        wal: dict[bool, list[float]] = {True: [], False: []}
        stats = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'devices_device'"
        for _ in range(args.rounds):
            for present in (True, False):
                index(present)
                fleet_fresh()
                sample = random.sample(ids, args.updates)
                sql("SELECT pg_stat_force_next_flush()")
                before = sql(stats)[0]
                wal_before = sql("SELECT pg_current_wal_lsn()")[0][0]
                t0 = time.perf_counter()
                for device_id in sample:
                    sql(_MARK_SEEN_SQL, [[device_id]])
                results[present].append((time.perf_counter() - t0) * 1000 / args.updates)
                wal[present].append(
                    sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", [wal_before])[0][0] / args.updates
                )
                sql("SELECT pg_stat_force_next_flush()")
                time.sleep(0.6)  # the statistics view is refreshed asynchronously
                after = sql(stats)[0]
                updates = after[0] - before[0]
                hot[present].append(100 * (after[1] - before[1]) / updates if updates else float("nan"))
        sql("SET synchronous_commit = on")
        for present in (True, False):
            label = "with the index   " if present else "without the index"
            print(
                f"{label}: median {statistics.median(results[present]):.3f} ms per UPDATE (round trip included), "
                f"{statistics.median(wal[present]):.0f} WAL bytes each (the whole server's WAL: other databases' "
                f"writes count too), HOT {statistics.median(hot[present]):.0f}% of updates"
            )

        print("\n--- tombstones for 1000 devices (the cache's Redis scripts)")
        versions = {device_cache_key(device_id): 10**6 for device_id in ids[:1000]}
        ttl = _tombstone_ttl_ms()
        ways = {
            "one call per key": lambda: [versioned_cache_invalidate(key=key, version=v) for key, v in versions.items()],
            "pipelined, one script per key": lambda: pipelined(versions, ttl),
            "one multi-key script call (versioned_cache_invalidate_many)": lambda: versioned_cache_invalidate_many(
                versions=versions
            ),
        }
        spent: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(max(args.rounds, 5)):
            for name, way in ways.items():
                t0 = time.perf_counter()
                way()
                spent[name].append((time.perf_counter() - t0) * 1000)
        for name, ms in spent.items():
            print(f"{name}: median {statistics.median(ms):.1f} ms")
    finally:
        redis_prefix_flush(prefix)


if __name__ == "__main__":
    main()
