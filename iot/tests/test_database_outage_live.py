"""Postgres stopped under load: fast 503s, liveness untouched, readiness honest, quick recovery, nothing lost.

The platform under test gets a Postgres server of its own (pgserver's binaries,
the same launcher `make run` uses), so stopping it touches nothing else of the
suite. While 48 clients send points (more than the 2 x 16 request threads, the
case where liveness used to take 9.7 s), the server is stopped for a few
seconds and started again. Figures are printed (run with `-s` to see them).
"""

from __future__ import annotations

import importlib.util
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import environ
import httpx
import psycopg
import pytest

from iot.testing.live import UNLIMITED, register_device
from iot.testing.processes import (
    REPO_ROOT,
    Platform,
    devservices_module,
    http_client,
    platform_env,
    psycopg_conninfo,
    run_manage,
    start_web,
    wait_until,
)

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(importlib.util.find_spec("pgserver") is None, reason="needs the pgserver package"),
]

CLIENTS = 48
OUTAGE_SECONDS = 4.0


@dataclass
class Outcome:
    sent: float
    done: float
    status: int  # 0: no HTTP answer at all
    retry_after: str | None = None


@dataclass
class Load:
    """Clients sending single points in a loop; every answer is kept with its timing."""

    platform: Platform
    token: str
    device_ids: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    accepted: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        device_id = self.device_ids[index % len(self.device_ids)]
        with http_client(self.platform, self.token, timeout=30.0) as client:
            while not self.stop.is_set():
                body = {
                    "device_id": device_id,
                    "timestamp": datetime.now(UTC).isoformat(),
                    "metric": "load",
                    "value": 1.0,
                }
                sent = time.monotonic()
                try:
                    response = client.post("/telemetry/point", json=body)
                    outcome = Outcome(sent, time.monotonic(), response.status_code, response.headers.get("Retry-After"))
                except httpx.HTTPError:
                    outcome = Outcome(sent, time.monotonic(), 0)
                with self.lock:
                    self.outcomes.append(outcome)
                    if outcome.status == 202:
                        self.accepted[device_id] = self.accepted.get(device_id, 0) + 1
                if outcome.status != 202:
                    time.sleep(0.05)  # what a client honouring Retry-After would do, shortened


@pytest.fixture
def own_postgres():
    devservices = devservices_module()
    instance = REPO_ROOT / "var" / f"outage-test-{uuid.uuid4().hex[:8]}"
    server = devservices.Postgres(instance)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(instance)], check=False)


def _timed_get(client: httpx.Client, path: str) -> tuple[float, int, dict]:
    started = time.monotonic()
    response = client.get(path)
    return time.monotonic() - started, response.status_code, response.json()


def test_postgres_outage_under_load(own_postgres, tmp_path):
    env = platform_env(
        database=own_postgres.url,
        extra={
            "REDIS_KEY_PREFIX": f"iottest-outage-{uuid.uuid4().hex[:6]}",
            **UNLIMITED,
        },
    )
    run_manage(env, "migrate", "--no-input", "-v", "0")
    token = run_manage(env, "create_api_token", "outage-operator").strip().splitlines()[-1]
    running = Platform(env=env)
    try:
        start_web(running, workers=2, log_dir=tmp_path)
        with http_client(running, token) as api:
            device_ids = [register_device(api, "OUTAGE")["id"] for _ in range(8)]

            load = Load(platform=running, token=token, device_ids=device_ids)
            threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            wait_until(lambda: sum(load.accepted.values()) >= 200, timeout=30, message="load under way")

            stopped_at = time.monotonic()
            own_postgres.stop()
            down_at = time.monotonic()

            # Readiness reports the outage, each probe bounded; liveness and metrics stay fast.
            ready_latencies, live_latencies, metrics_latencies = [], [], []
            first_unready = None
            while time.monotonic() - down_at < OUTAGE_SECONDS:
                elapsed, status, body = _timed_get(api, "/health/ready")
                ready_latencies.append(elapsed)
                if status == 503 and body["checks"]["database"] != "ok" and first_unready is None:
                    first_unready = time.monotonic() - down_at
                elapsed, status, _ = _timed_get(api, "/health/live")
                assert status == 200
                live_latencies.append(elapsed)
                started = time.monotonic()
                assert api.get("/metrics").status_code == 200
                metrics_latencies.append(time.monotonic() - started)
                time.sleep(0.05)

            restart_began = time.monotonic()
            own_postgres.start()
            back_at = time.monotonic()
            first_accepted = wait_until(
                lambda: next((o.done for o in list(load.outcomes) if o.sent >= back_at and o.status == 202), None),
                timeout=30,
                message="a 202 after Postgres returned",
            )
            wait_until(
                lambda: _timed_get(api, "/health/ready")[2]["checks"]["database"] == "ok",
                timeout=10,
                message="readiness back",
            )
            load.stop.set()
            for thread in threads:
                thread.join(60)
    finally:
        running.stop()

    during = [o for o in load.outcomes if o.sent >= down_at + 0.2 and o.done <= restart_began]
    refusals = [o for o in during if o.status != 202]
    refusal_latencies = sorted(o.done - o.sent for o in refusals)
    p99 = refusal_latencies[int(len(refusal_latencies) * 0.99) - 1] if refusal_latencies else 0.0
    figures = {
        "stop_took_s": round(down_at - stopped_at, 2),
        "requests_during_outage": len(during),
        "503_latency_median_s": round(refusal_latencies[len(refusal_latencies) // 2], 3),
        "503_latency_p99_s": round(p99, 3),
        "503_latency_max_s": round(refusal_latencies[-1], 3),
        "liveness_max_ms": round(max(live_latencies) * 1000, 1),
        "metrics_max_ms": round(max(metrics_latencies) * 1000, 1),
        "readiness_max_s": round(max(ready_latencies), 3),
        "readiness_reports_outage_after_s": round(first_unready, 3) if first_unready is not None else None,
        "postgres_restart_took_s": round(back_at - restart_began, 2),
        "first_202_after_return_s": round(first_accepted - back_at, 3),
        "no_answer": sum(1 for o in load.outcomes if o.status == 0),
    }
    print("\npostgres outage figures:", figures)

    assert refusals, "no request met the outage"
    assert all(o.status == 503 and o.retry_after for o in refusals), {o.status for o in refusals}
    assert not any(o.status == 0 for o in load.outcomes), "a request got no HTTP answer"
    assert not any(o.status >= 500 and o.status != 503 for o in load.outcomes)
    assert p99 < 1.5, figures
    assert max(live_latencies) < 1.0, figures  # ~30 ms on a quiet machine; 9.7 s before
    assert max(metrics_latencies) < 1.0, figures
    assert first_unready is not None and first_unready < 1.5, figures
    assert max(ready_latencies) < 1.5, figures
    assert figures["first_202_after_return_s"] < 10, figures

    # Every point answered 202 is in Postgres.
    conninfo = psycopg_conninfo(environ.Env.db_url_config(own_postgres.url))
    with psycopg.connect(**conninfo) as conn:
        stored = dict(
            conn.execute(
                "SELECT device_id::text, count(*) FROM telemetry_point WHERE metric = 'load' GROUP BY 1"
            ).fetchall()
        )
    for device_id, accepted in load.accepted.items():
        assert stored.get(device_id, 0) == accepted, (device_id, stored.get(device_id), accepted)
