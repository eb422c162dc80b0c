#!/usr/bin/env python
"""What an `Idempotency-Key` costs a telemetry request, measured in-process.

    python bench/idempotency_cost.py [--requests 2000] [--rounds 3] [--batch-size 1]

Runs Django's full request stack (middleware, auth, DRF, validation, the
ingestion service) in this process against real Postgres and Redis (from
DATABASE_URL / REDIS_URL; `make bench` starts embedded ones), one request at a
time, alternating blocks without and with a fresh key per request. Per request
it prints wall time (which includes the Postgres and Redis round trips) and this
process's CPU, and the ratio with/without. In-process, so the figure is the
server's cost, not an HTTP client's.

The key adds to a request: one `INSERT ... ON CONFLICT` that claims it, two
`set_config` calls bounding the wait, the `UPDATE` that stores the response,
the request's fingerprint (a SHA-256 of its canonical JSON) and an explicit
transaction around it all. Without the header nothing of that runs.
"""

import argparse
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
    parser.add_argument("--requests", type=int, default=2000, help="requests per block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1, help="1: /telemetry/point; more: /telemetry/batch")
    args = parser.parse_args()

    prefix = f"iotbench-idem-{uuid.uuid4().hex[:6]}"
    in_process_django(database_name="iot_bench_idempotency", redis_prefix=prefix)
    from django.contrib.auth import get_user_model
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from devices.services import device_register
    from iot.testing.redis import redis_prefix_flush

    user = get_user_model().objects.create(username="bench")
    token = Token.objects.create(user=user).key
    device_id = str(
        device_register(serial_number=f"BENCH-{uuid.uuid4().hex}", device_type="s", firmware_version="1").device.pk
    )
    client = Client(HTTP_AUTHORIZATION=f"Token {token}")
    path = "/telemetry/point" if args.batch_size == 1 else "/telemetry/batch"
    start = datetime.now(UTC) - timedelta(hours=1)
    counter = 0

    def body() -> dict:
        nonlocal counter
        counter += 1
        ts = (start + timedelta(microseconds=counter)).isoformat()
        if args.batch_size == 1:
            return {"device_id": device_id, "timestamp": ts, "metric": "bench", "value": 1.0}
        points = [{"timestamp": ts, "metric": f"m{i}", "value": float(i)} for i in range(args.batch_size)]
        return {"device_id": device_id, "points": points}

    def block(with_key: bool) -> tuple[float, float]:
        bodies = [body() for _ in range(args.requests)]
        wall, cpu = time.perf_counter(), time.process_time()
        for payload in bodies:
            extra = {"HTTP_IDEMPOTENCY_KEY": uuid.uuid4().hex} if with_key else {}
            response = client.post(path, payload, content_type="application/json", **extra)
            assert response.status_code == 202, response.content
        return (time.perf_counter() - wall) / args.requests * 1000, (time.process_time() - cpu) / args.requests * 1000

    block(False)  # warm-up: connections, caches, code paths
    block(True)
    print(f"{path}, {args.batch_size} point(s) per request, {args.requests} requests per block, sequential")
    totals = {False: [0.0, 0.0], True: [0.0, 0.0]}
    for n in range(1, args.rounds + 1):
        for with_key in (False, True):
            wall, cpu = block(with_key)
            totals[with_key][0] += wall
            totals[with_key][1] += cpu
            label = "with key   " if with_key else "without key"
            print(f"  round {n} {label}: {wall:.3f} ms wall, {cpu:.3f} ms CPU per request")
    (wall_off, cpu_off), (wall_on, cpu_on) = totals[False], totals[True]
    print(
        f"with/without: wall x{wall_on / wall_off:.2f} (+{(wall_on - wall_off) / args.rounds:.3f} ms), "
        f"CPU x{cpu_on / cpu_off:.2f} (+{(cpu_on - cpu_off) / args.rounds:.3f} ms)"
    )
    redis_prefix_flush(prefix)


if __name__ == "__main__":
    main()
