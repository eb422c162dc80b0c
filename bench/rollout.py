#!/usr/bin/env python
"""A staged firmware rollout over simulated devices: how long it takes, updates/s, each stage's duration.

    python bench/rollout.py [--devices 500] [--failure-rate 0.01] [--artifact-kb 1024] [--stages 1,10,100]

Against the real platform (web x2 processes + a Celery worker with beat, `bench/_harness`) on a
fresh database: a release with a `--artifact-kb` artifact, `--devices` simulated devices
(`iot.simulator.FleetSimulator`, one process, HTTP; telemetry every 60 s, OTA polls every
`--poll` s while idle and every 0.5 s while updating), then `POST /firmware/rollouts` over all
of them. Timed from the POST to the rollout being settled (every update final), read from the
API every 0.5 s. Figures: total duration, updates finished per second, each stage from its
start to its pass (server clocks), and the counts. Every update is a saga of 6 steps in the
worker plus the device's 5 requests (poll, 4 reports) and its download.
"""

import argparse
import hashlib
import sys
import time
from datetime import datetime

import httpx
from _harness import UNLIMITED_ENV, api_token, fresh_database, running_platform

from iot.simulator.fleet import FleetSimulator

ENV = {**UNLIMITED_ENV, "REDIS_KEY_PREFIX": "rollout-bench", "LOG_LEVEL": "WARNING"}


def wait_ready(api: httpx.Client, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while api.get("/health/ready").status_code != 200:
        if time.monotonic() > deadline:
            sys.exit("the platform was not ready in time")
        time.sleep(0.2)


def publish(api: httpx.Client, version: str, size: int) -> None:
    content = (hashlib.sha256(version.encode()).digest() * (size // 32 + 1))[:size]
    body = {"version": version, "checksum": f"sha256:{hashlib.sha256(content).hexdigest()}", "size_bytes": size}
    api.post("/firmware/register", json=body).raise_for_status()
    api.put(f"/firmware/versions/{version}/artifact", files={"file": ("image.bin", content)}).raise_for_status()


def seconds_between(start: str | None, end: str | None) -> float | None:
    if start is None or end is None:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--failure-rate", type=float, default=0.01)
    parser.add_argument("--artifact-kb", type=int, default=1024)
    parser.add_argument("--stages", default="1,10,100")
    parser.add_argument("--poll", type=float, default=10.0, help="idle OTA poll interval of each device (s)")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    stages = [float(stage) for stage in args.stages.split(",")]

    database = fresh_database("iot_rollout_bench")
    token = api_token(database)
    with running_platform(database, extra_env=ENV, with_worker=True) as platform:
        with httpx.Client(base_url=platform.base_url, headers={"Authorization": f"Token {token}"}, timeout=60) as api:
            wait_ready(api)
            version = "2.0.0-bench"
            publish(api, version, args.artifact_kb * 1024)
            fleet = FleetSimulator(
                base_url=platform.base_url,
                operator_token=token,
                devices=args.devices,
                prefix="BENCH",
                interval=60.0,
                failure_rate=args.failure_rate,
                ota_poll_interval=0.5,
                ota_idle_poll_interval=args.poll,
                seed=1,
                max_connections=64,
            )
            registration = fleet.register()
            print(f"{args.devices} devices registered in {registration.seconds:.1f} s")
            body = {
                "to_version": version,
                "group_id": "BENCH-group-0",
                "stages": stages,
                # One failing device in the first stage (1% of 500 = 5) must not stop it, nor a few early failures.
                "success_threshold": 0.8,
                "error_threshold": 0.2,
                "error_min_finished": 20,
            }
            with fleet.running():
                started = time.monotonic()
                response = api.post("/firmware/rollouts", json=body)
                response.raise_for_status()
                rollout_id = response.json()["id"]
                post_ms = (time.monotonic() - started) * 1000
                deadline = started + args.timeout
                while True:
                    rollout = api.get(f"/firmware/rollouts/{rollout_id}").json()
                    if rollout["settled_at"] is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                elapsed = time.monotonic() - started
            stats = fleet.stats()

    progress = rollout["progress"]
    counts = progress["counts"]
    finished = counts["installed"] + counts["failed"] + counts["rolled_back"]
    server_seconds = seconds_between(rollout["created_at"], rollout["settled_at"])
    print(
        f"rollout over {progress['targets']} devices, stages {stages}, {args.artifact_kb} KB artifact, "
        f"failure rate {args.failure_rate:g}: {rollout['status']}"
        + (f" ({rollout['stop_reason']})" if rollout["stop_reason"] else "")
    )
    print(f"  POST /firmware/rollouts (targets resolved, stages made): {post_ms:.0f} ms")
    print(
        f"  total {elapsed:.1f} s seen by the client, {server_seconds or float('nan'):.1f} s by the server "
        f"(created -> settled); {finished} updates finished = {finished / elapsed:.1f} updates/s"
    )
    for stage in progress["per_stage"]:
        duration = seconds_between(stage["started_at"], stage["passed_at"])
        print(
            f"  stage {stage['stage']} ({stage['percent']:g}%, {stage['targets']} devices): "
            + (f"{duration:.1f} s from start to pass" if duration is not None else stage["state"])
            + f"; installed {stage['counts']['installed']}, failed {stage['counts']['failed']}"
        )
    print(f"  counts {counts}")
    print(
        f"  devices: {stats.requests} requests, {stats.ota_polls} OTA polls, {stats.transport_errors} transport "
        f"errors, {stats.server_errors} server errors, {stats.updates_installed} installed, "
        f"{stats.updates_failed} failed, {stats.updates_abandoned} abandoned"
    )


if __name__ == "__main__":
    main()
