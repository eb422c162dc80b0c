#!/usr/bin/env python
"""What evaluating alert rules adds to telemetry ingestion, measured in-process.

    python bench/alerts_eval.py [--requests 1000] [--rounds 3] [--batch-size 1]

Rule evaluation runs inside the ingest transaction (`alerts.services.alerts_evaluate`,
the hook telemetry calls after the points' insert; the insert statement itself also
returns the versions of the device's rule scopes, `alerts.selectors.RULE_VERSIONS_SQL`).
This runs, one request at a time against real Postgres and Redis (DATABASE_URL /
REDIS_URL), these modes:

* `http`: a whole `POST /telemetry/point|batch` through Django's stack (middleware,
  auth, DRF, validation, ingestion): the CPU a web process spends on an ingest request;
* `ingest, no hook`: `telemetry_points_ingest` with no hook registered (telemetry
  alone: admission, rate limit, insert, mark-seen, commit, after-commit publish);
* `ingest + evaluate, ...`: the same as deployed, the alerts hook registered (its
  expression in the insert statement, then the evaluation), for a device with no rule
  in its scopes (rules exist elsewhere), for one whose group has a rule this process
  holds but no point violates, and for one whose group rule every point violates
  (one `INSERT ... ON CONFLICT DO UPDATE` per request);
* `evaluate alone, ...`: `alerts_evaluate` by itself in a loop with the versions the
  statement would give, the cleanest figure of its own CPU (no other work's noise).

It prints wall time and this process's CPU per request (`time.process_time`: the
Postgres and Redis servers' own CPU is not in it) and the added CPU relative to
`http` and to `ingest`. The target: with no rule matching, under 5% of the ingest
request's CPU. The wall-time difference includes the Postgres side (the two primary-key
probes of the versions' expression). The modes are interleaved request by request, so that load from other
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
    from django.contrib.auth import get_user_model
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from alerts.services import alert_rule_create, alerts_evaluate
    from devices.services import device_register
    from iot.testing.redis import redis_prefix_flush
    from telemetry.services import PointColumns, telemetry_points_ingest

    def device(group: str) -> uuid.UUID:
        serial = f"BENCH-{uuid.uuid4().hex}"
        return device_register(serial_number=serial, device_type="s", firmware_version="1", group_id=group).device.pk

    quiet, matching, held = device("quiet"), device("hot"), device("held")
    # Rules elsewhere, so the tables are not empty: none applies to `quiet` or its group.
    for n in range(50):
        alert_rule_create(device_id=device(f"other-{n}"), metric="bench", operator="gt", threshold=0.0)
        alert_rule_create(group_id=f"other-{n}", metric="bench", operator="gt", threshold=0.0)
    alert_rule_create(group_id="hot", metric="bench", operator="gt", threshold=-1.0)  # every point violates
    alert_rule_create(group_id="held", metric="bench", operator="gt", threshold=1e9)  # never violated

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

    import telemetry.services as telemetry_services

    hooked = list(telemetry_services._points_stored_hooks)

    def hooks(on: bool) -> None:
        """Ingestion with the alerts hook (as deployed) or without any (telemetry alone)."""
        if (telemetry_services._points_stored_hooks == hooked) != on:
            telemetry_services._points_stored_hooks[:] = hooked if on else []
            telemetry_services._store_sql.clear()

    def ingest(device_id, evaluate):
        batch = columns(device_id)

        def run():
            hooks(evaluate)
            telemetry_points_ingest(batch=batch)

        return run

    def evaluate_alone(device_id, group, versions):
        batch = columns(device_id)

        def run():
            # Autocommit: the upsert (when any) commits by itself; no transaction to open for no rule.
            alerts_evaluate(
                device_id=device_id,
                group_id=group,
                metrics=batch.metrics,
                values=batch.values,
                timestamps=batch.timestamps,
                rule_versions=versions,
            )

        return run

    from alerts.models import AlertRuleScope

    hot_versions = [0, AlertRuleScope.objects.get(scope="group:hot").version]
    held_versions = [0, AlertRuleScope.objects.get(scope="group:held").version]
    blocks = {
        "http": lambda: http(quiet),
        "ingest, no hook": lambda: ingest(quiet, False),
        "ingest + evaluate, no rule": lambda: ingest(quiet, True),
        "ingest + evaluate, rules held, none matching": lambda: ingest(held, True),
        "ingest + evaluate, every point matching": lambda: ingest(matching, True),
        "evaluate alone, no rule": lambda: evaluate_alone(quiet, "quiet", [0, 0]),
        "evaluate alone, rules held, none matching": lambda: evaluate_alone(held, "held", held_versions),
        "evaluate alone, every point matching": lambda: evaluate_alone(matching, "hot", hot_versions),
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
    http_cpu, ingest_cpu = median["http"][1], median["ingest, no hook"][1]
    ingest_wall = median["ingest, no hook"][0]
    for case in ("no rule", "rules held, none matching", "every point matching"):
        wall, cpu = median[f"ingest + evaluate, {case}"]
        added, added_wall = cpu - ingest_cpu, wall - ingest_wall
        alone = median[f"evaluate alone, {case}"][1]
        print(
            f"evaluation, {case}: {added:+.3f} ms CPU ({added / http_cpu:+.1%} of the HTTP request's CPU, "
            f"{added / ingest_cpu:+.1%} of the ingest service's), {added_wall:+.3f} ms wall; "
            f"alone {alone:.3f} ms CPU ({alone / http_cpu:.1%} of the HTTP request's, {alone / ingest_cpu:.1%} "
            f"of the ingest service's)"
        )
    redis_prefix_flush(prefix)


if __name__ == "__main__":
    main()
