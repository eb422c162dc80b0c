"""Grader for task 04 (alert notifications and their circuit breaker), over HTTP against the live platform.

The seed has no grader for this task; these follow its task.yaml. Alert rules notify a webhook channel
whose receiver runs in this test process and counts every call it gets. When the receiver fails (503
at once) or hangs (the platform's 1 s read timeout ends each call), the channel's breaker must open after
3 consecutive failures, so the receiver gets at most those plus what the worker's 2 processes had in
flight, plus one half-open probe, however many alerts are waiting; alerts must still be stored and
ingestion stay fast; and once the receiver answers again the breaker must close and every notification
be delivered, once. A breaker that never opens lets every delivery and every retry through: the receiver
is called again and again.
"""

import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from iot.testing.processes import wait_until

pytestmark = pytest.mark.live

THRESHOLD = 3  # CIRCUIT_BREAKER_FAILURE_THRESHOLD in conftest.py
WORKER_PROCESSES = 2
# The failures that open the breaker, the calls the other worker process had started meanwhile, one probe.
MAX_CALLS_BEFORE_OPEN = THRESHOLD + (WORKER_PROCESSES - 1) + 1
DEVICES = 20


class Receiver:
    """A webhook receiver on a loopback port: `fail` answers 503 at once, `hang` never answers, `ok`
    answers 200 and records the notification's Idempotency-Key. `hits` counts every call received."""

    def __init__(self, mode: str):
        self.mode = mode
        self.hits = 0
        self.delivered: list[str] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.hits += 1
                    mode = receiver.mode
                if mode == "hang":
                    receiver.released.wait(60)
                    self.close_connection = True
                    return
                if mode == "ok":
                    with receiver.lock:
                        receiver.delivered.append(self.headers.get("Idempotency-Key", ""))
                self.send_response(200 if mode == "ok" else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        with self.lock:
            self.mode = mode
        self.released.set()

    def calls(self) -> int:
        with self.lock:
            return self.hits

    def acknowledged(self) -> list[str]:
        with self.lock:
            return list(self.delivered)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def failing():
    receiver = Receiver("fail")
    yield receiver
    receiver.close()


@pytest.fixture
def hanging():
    receiver = Receiver("hang")
    yield receiver
    receiver.close()


def alerting(api, receiver: Receiver) -> tuple[str, str, list[str]]:
    """A webhook channel to `receiver`, a rule (temperature > 30) on a new group notifying it, and DEVICES
    devices in that group; returns (channel id, rule id, device ids)."""
    channel = api.post(
        "/alerts/channels", json={"name": f"hook-{uuid.uuid4().hex[:8]}", "kind": "webhook", "url": receiver.url}
    )
    assert channel.status_code == 201, channel.text
    group = f"grp-{uuid.uuid4().hex[:8]}"
    rule = api.post(
        "/alerts/rules",
        json={
            "group_id": group,
            "metric": "temperature",
            "operator": "gt",
            "threshold": 30.0,
            "channel_ids": [channel.json()["id"]],
        },
    )
    assert rule.status_code == 201, rule.text
    devices = []
    for _ in range(DEVICES):
        response = api.post(
            "/devices",
            json={
                "serial_number": f"SN-ALERT-{uuid.uuid4().hex}",
                "device_type": "sensor",
                "firmware_version": "1.0.0",
                "group_id": group,
            },
        )
        assert response.status_code == 201, response.text
        devices.append(response.json()["id"])
    return channel.json()["id"], rule.json()["id"], devices


def violate(api, devices: list[str], points_per_device: int = 1) -> list[float]:
    """Send violating points (40+ > 30) from every device; returns each request's latency (all must be 202)."""
    start = datetime.now(UTC) - timedelta(minutes=5)

    def send(index: int) -> list[float]:
        latencies = []
        for n in range(points_per_device):
            body = {
                "device_id": devices[index],
                "timestamp": (start + timedelta(milliseconds=n)).isoformat(),
                "metric": "temperature",
                "value": 40.0 + n,
            }
            began = time.perf_counter()
            response = api.post("/telemetry/point", json=body)
            latencies.append(time.perf_counter() - began)
            assert response.status_code == 202, response.text
        return latencies

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [latency for latencies in pool.map(send, range(len(devices))) for latency in latencies]


def breaker_state(api, channel_id: str) -> str:
    response = api.get(f"/alerts/channels/{channel_id}")
    assert response.status_code == 200, response.text
    return response.json()["breaker_state"]


def assert_breaker_opens(api, channel_id: str, receiver: Receiver) -> None:
    """The breaker opens, and by then the receiver has been called no more than MAX_CALLS_BEFORE_OPEN times
    (a breaker that never opens lets the calls pile up: the wait ends as soon as they pass the bound)."""
    wait_until(
        lambda: breaker_state(api, channel_id) == "open" or receiver.calls() > MAX_CALLS_BEFORE_OPEN,
        timeout=90,
        interval=0.05,
        message="the breaker to open (or the receiver to be called too often)",
    )
    calls = receiver.calls()
    assert breaker_state(api, channel_id) == "open", f"the breaker did not open; the receiver got {calls} calls"
    assert calls <= MAX_CALLS_BEFORE_OPEN, f"the receiver got {calls} calls before the breaker opened"


def test_repeated_failures_open_the_breaker_and_stop_the_calls(api, failing):
    channel_id, _, devices = alerting(api, failing)
    violate(api, devices)
    assert_breaker_opens(api, channel_id, failing)


def test_a_hanging_receiver_neither_slows_alert_processing_nor_gets_every_call(api, hanging):
    channel_id, _, devices = alerting(api, hanging)
    latencies = violate(api, devices, points_per_device=3)
    mean_ms = statistics.mean(latencies) * 1000
    print(f"\ningest latency while the receiver hangs: mean {mean_ms:.1f} ms over {len(latencies)} requests")
    assert mean_ms < 500
    assert_breaker_opens(api, channel_id, hanging)


def test_alerts_are_stored_even_when_notifications_fail(api, failing):
    _, rule_id, devices = alerting(api, failing)
    violate(api, devices, points_per_device=2)

    def alerts() -> list[dict]:
        response = api.get("/alerts", params={"rule_id": rule_id, "limit": 1000})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    found = wait_until(lambda: len(alerts()) == DEVICES and alerts(), timeout=30, message="an alert per device")
    assert {alert["device_id"] for alert in found} == set(devices)
    assert {alert["status"] for alert in found} == {"open"}


def test_the_breaker_recovers_and_every_notification_is_delivered_once(api, failing):
    channel_id, _, devices = alerting(api, failing)
    violate(api, devices)
    assert_breaker_opens(api, channel_id, failing)
    failing.set_mode("ok")
    # Open -> half-open after the timeout, one probe succeeds -> closed, then the held deliveries go out.
    wait_until(
        lambda: len(set(failing.acknowledged())) == DEVICES,
        timeout=120,
        interval=0.1,
        message="every notification to be delivered",
    )
    wait_until(lambda: breaker_state(api, channel_id) == "closed", timeout=30, message="the breaker to close")
    delivered = failing.acknowledged()
    assert len(delivered) == len(set(delivered)), "a notification was delivered twice"
