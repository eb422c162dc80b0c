#!/usr/bin/env python
"""What evaluating alert rules adds to telemetry ingestion, measured in-process.

    python bench/alerts_eval.py [--requests 1000] [--rounds 3] [--batch-size 1]

Rule evaluation runs inside the ingest transaction (`alerts.services.alerts_evaluate`,
called after the points' insert). This runs, one request at a time against real
Postgres and Redis (DATABASE_URL / REDIS_URL), these modes:

* `http`: a whole `POST /telemetry/point|batch` through Django's stack (middleware,
  auth, DRF, validation, ingestion): the CPU a web process spends on an ingest
  request, the denominator of the target;
* `ingest`: `telemetry_points_ingest` alone, in a transaction (admission, rate
  limit, insert, mark-seen, commit, after-commit publish);
* `ingest + evaluate, no rule`: the same plus `alerts_evaluate` in the same
  transaction, as the hook will run it, for a device in a group, with rules on
  other devices and groups but none on this device or its group;
* `ingest + evaluate, every point matching`: the same for a device whose group rule
  every point violates (one `INSERT ... ON CONFLICT DO UPDATE` per request);
* `evaluate alone, ...`: `alerts_evaluate` by itself in a loop, the cleanest figure of
  its own cost (no other work's noise to subtract);
* `insert statement` and `insert statement + rules`: the points' INSERT as ingestion
  runs it (in a transaction, committed), and the same statement also returning the
  device's group and the JSON of its device and group rules (subqueries, one index
  probe each): what reading the rules from Postgres in the statement ingestion already
  makes, instead of from Redis in a round trip of its own, would cost (an alternative
  hook, see the alerts report).

It prints wall time and this process's CPU per request (`time.process_time`: the
Postgres and Redis servers' own CPU is not in it) and the added CPU relative to
`http` and to `ingest`. The target: with no rule matching, under 5% of the ingest
request's CPU. The modes are interleaved request by request, so that load from other
processes on the machine falls on all of them alike; the medians of `--rounds` rounds
are reported.
"""

import argparse
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _harness import in_process_django  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1, help="points per request (1: /telemetry/point)")
    args = parser.parse_args()

    prefix = f"iotbench-alerts-{uuid.uuid4().hex[:6]}"
    in_process_django(database_name="iot_bench_alerts", redis_prefix=prefix)
    import psycopg
    from django.contrib.auth import get_user_model
    from django.db import DEFAULT_DB_ALIAS, connections, transaction
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from alerts.services import alert_rule_create, alerts_evaluate
    from devices.services import device_register
    from iot.testing.redis import redis_prefix_flush
    from telemetry.services import PointColumns, telemetry_points_ingest

    def device(group: str) -> uuid.UUID:
        serial = f"BENCH-{uuid.uuid4().hex}"
        return device_register(serial_number=serial, device_type="s", firmware_version="1", group_id=group).device.pk

    quiet, matching = device("quiet"), device("hot")
    # Rules elsewhere, so the tables are not empty: none applies to `quiet` or its group.
    for n in range(50):
        alert_rule_create(device_id=device(f"other-{n}"), metric="bench", operator="gt", threshold=0.0)
        alert_rule_create(group_id=f"other-{n}", metric="bench", operator="gt", threshold=0.0)
    alert_rule_create(group_id="hot", metric="bench", operator="gt", threshold=-1.0)  # every point violates

    user = get_user_model().objects.create(username="bench")
    client = Client(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    path = "/telemetry/point" if args.batch_size == 1 else "/telemetry/batch"
    start = datetime.now(UTC) - timedelta(hours=1)
    counter = 0

    def stamps() -> list[datetime]:
        nonlocal counter
        counter += 1
        return [start + timedelta(microseconds=counter * args.batch_size + i) for i in range(args.batch_size)]

    def columns(device_id) -> PointColumns:
        ts = stamps()
        return PointColumns(device_id=device_id, metrics=["bench"] * len(ts), timestamps=ts, values=[1.0] * len(ts))

    def http(device_id):
        ts = stamps()
        if args.batch_size == 1:
            body = {"device_id": str(device_id), "timestamp": ts[0].isoformat(), "metric": "bench", "value": 1.0}
        else:
            points = [{"timestamp": t.isoformat(), "metric": "bench", "value": 1.0} for t in ts]
            body = {"device_id": str(device_id), "points": points}
        return lambda: client.post(path, body, content_type="application/json")

    def ingest(device_id, group, evaluate):
        batch = columns(device_id)

        def run():
            with transaction.atomic():
                telemetry_points_ingest(batch=batch)
                if evaluate:
                    alerts_evaluate(
                        device_id=device_id,
                        group_id=group,
                        metrics=batch.metrics,
                        values=batch.values,
                        timestamps=batch.timestamps,
                    )

        return run

    # The points' INSERT as telemetry runs it, and the same statement also returning the device's group
    # and the JSON of its rules (the payload `alerts.selectors` caches), read in the same snapshot.
    from devices.sql import device_live_sql
    from telemetry.services import _INSERT_SQL

    def rules_json(column: str, value: str) -> str:
        return f"""(SELECT COALESCE(json_object_agg(metric, rules)::text, '{{}}')
            FROM (SELECT metric, json_agg(json_build_array(id, operator, threshold, severity) ORDER BY id) AS rules
                  FROM alerts_alertrule WHERE enabled AND {column} = {value} GROUP BY metric) AS by_metric)"""

    def statement(device_id, with_rules: bool):
        batch = columns(device_id)
        device_sql, device_params = device_live_sql(device_id=device_id)
        sql = _INSERT_SQL.format(device=device_sql)
        params = [*device_params, batch.metrics, batch.timestamps, batch.values]
        if with_rules:
            sql = f"""
                WITH ins AS ({sql} RETURNING 1), d AS (SELECT group_id FROM devices_device WHERE id = %b)
                SELECT (SELECT count(*) FROM ins), d.group_id,
                       {rules_json("device_id", "%b")}, {rules_json("group_id", "d.group_id")}
                FROM d"""
            params += [device_id, device_id]
        db = connections[DEFAULT_DB_ALIAS]

        def run():
            with transaction.atomic():
                db.ensure_connection()
                with psycopg.Cursor(db.connection) as cursor:
                    cursor.execute(sql, params)
                    if with_rules:
                        count, _group_id, device_rules, group_rules = cursor.fetchone()
                        assert count == len(batch) and device_rules == "{}" and group_rules == "{}"

        return run

    def evaluate_alone(device_id, group):
        batch = columns(device_id)

        def run():
            # Autocommit: the upsert (when any) commits by itself; no transaction to open for no rule.
            alerts_evaluate(
                device_id=device_id,
                group_id=group,
                metrics=batch.metrics,
                values=batch.values,
                timestamps=batch.timestamps,
            )

        return run

    blocks = {
        "http": lambda: http(quiet),
        "ingest": lambda: ingest(quiet, "quiet", False),
        "ingest + evaluate, no rule": lambda: ingest(quiet, "quiet", True),
        "ingest + evaluate, every point matching": lambda: ingest(matching, "hot", True),
        "evaluate alone, no rule": lambda: evaluate_alone(quiet, "quiet"),
        "evaluate alone, every point matching": lambda: evaluate_alone(matching, "hot"),
        "insert statement": lambda: statement(quiet, False),
        "insert statement + rules": lambda: statement(quiet, True),
    }

    def measure(calls) -> tuple[float, float]:
        """Run one prepared call; its wall and CPU seconds."""
        wall, cpu = time.perf_counter(), time.process_time()
        response = calls.pop()()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert response is None or response.status_code == 202, response.content
        return wall, cpu

    def round_(requests: int) -> dict[str, tuple[float, float]]:
        """Each mode `requests` times, interleaved request by request (the mode order rotating), so
        that load from other processes and the machine's drift fall on all modes alike."""
        calls = {name: [make() for _ in range(requests)] for name, make in blocks.items()}
        totals = {name: [0.0, 0.0] for name in blocks}
        names = list(blocks)
        for i in range(requests):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                wall, cpu = measure(calls[name])
                totals[name][0] += wall
                totals[name][1] += cpu
        return {name: (wall / requests * 1000, cpu / requests * 1000) for name, (wall, cpu) in totals.items()}

    round_(max(args.requests // 10, 20))  # warm-up: connections, caches, code paths
    results = [round_(args.requests) for _ in range(args.rounds)]
    median = {name: tuple(statistics.median(r[name][k] for r in results) for k in (0, 1)) for name in blocks}

    print(f"{args.batch_size} point(s) per request, {args.requests} requests per mode, {args.rounds} rounds, medians")
    for name, (wall, cpu) in median.items():
        print(f"  {name:<42} {wall:7.3f} ms wall {cpu:7.3f} ms CPU per request")
    http_cpu, ingest_cpu = median["http"][1], median["ingest"][1]
    for case in ("no rule", "every point matching"):
        added = median[f"ingest + evaluate, {case}"][1] - ingest_cpu
        alone = median[f"evaluate alone, {case}"][1]
        print(
            f"evaluation, {case}: +{added:.3f} ms CPU in the ingest transaction "
            f"({added / http_cpu:+.1%} of the HTTP request, {added / ingest_cpu:+.1%} of the ingest service); "
            f"alone {alone:.3f} ms ({alone / http_cpu:.1%} of the HTTP request)"
        )
    added = median["insert statement + rules"][1] - median["insert statement"][1]
    print(
        f"rules read in the insert statement instead: {added:+.3f} ms CPU ({added / http_cpu:+.1%} of the HTTP request)"
    )
    redis_prefix_flush(prefix)


if __name__ == "__main__":
    main()
