#!/usr/bin/env python
"""1 000 concurrent device registrations, half of them on one serial number.

    make bench                      # embedded Postgres/Redis when DATABASE_URL/REDIS_URL are unset
    python bench/registration.py --rounds 3 --requests 1000 --workers 2

Starts the real server (uvicorn, --workers processes) on a fresh database,
opens one connection per request, releases them all at once, and prints
throughput, latency percentiles and status codes, and checks the invariant:
exactly one device for the shared serial number.
"""

import argparse
import uuid
from urllib.parse import urlsplit

import environ
import orjson
import psycopg
from _harness import api_token, fresh_database, running_platform, summarize
from _loadgen import encode_request, run_load

from iot.testing.processes import psycopg_conninfo


def one_round(base_url: str, token: str, total: int) -> None:
    url = urlsplit(base_url)
    shared_serial = f"SN-BENCH-SHARED-{uuid.uuid4().hex[:8]}"
    requests = [
        encode_request(
            "POST",
            "/devices",
            host=url.netloc,
            token_header=f"Token {token}",
            body={
                "serial_number": shared_serial if i % 2 == 0 else f"SN-BENCH-{uuid.uuid4().hex}",
                "device_type": "sensor",
                "firmware_version": "1.0.0",
                "location": f"rack-{i}",
            },
        )
        for i in range(total)
    ]
    results, elapsed = run_load(host=url.hostname, port=url.port, requests=iter(requests), connections=total)
    statuses: dict[int, int] = {}
    for result in results:
        statuses[result.status] = statuses.get(result.status, 0) + 1
    bodies = [orjson.loads(r.body) for r in results]
    shared_ids = {b["id"] for b in bodies if b.get("serial_number") == shared_serial}
    print(
        f"  {total} requests in {elapsed:.2f} s = {total / elapsed:.0f} req/s; "
        f"{summarize([r.latency_s for r in results])}; statuses {dict(sorted(statuses.items()))}; "
        f"ids for the shared serial: {len(shared_ids)}"
    )
    assert len(shared_ids) == 1, "invariant broken: more than one device for one serial number"
    assert set(statuses) <= {200, 201}, f"unexpected statuses {statuses}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="web server processes")
    args = parser.parse_args()

    database = fresh_database("iot_bench_registration")
    token = api_token(database)
    with running_platform(database, workers=args.workers) as platform:
        print(
            f"registration bench: {args.requests} concurrent POST /devices (half on one serial), "
            f"{args.workers} server processes"
        )
        for _ in range(args.rounds):
            one_round(platform.base_url, token, args.requests)
    with psycopg.connect(**psycopg_conninfo(environ.Env.db_url_config(database))) as conn:
        (count,) = conn.execute("SELECT count(*) FROM devices_device").fetchone()
    expected = args.rounds * (args.requests // 2 + 1)
    print(f"  devices in the database: {count} (expected {expected})")
    assert count == expected


if __name__ == "__main__":
    main()
