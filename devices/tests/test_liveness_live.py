"""Device liveness on the live multi-process server: the worker's beat sweeps, the web processes read.

With a 2 s inactivity timeout swept every 0.5 s: a silent device turns `inactive` (never before its
timeout), comes back `active` with its next point (read through the other processes' cache at once),
and a device in maintenance is left alone.
"""

import time
from datetime import datetime

import pytest

from iot.testing.live import dedicated_platform, register_device
from iot.testing.processes import http_client, wait_until
from iot.testing.telemetry import point_body

pytestmark = pytest.mark.live

TIMEOUT_SECONDS = 2
ENV = {"DEVICE_INACTIVE_AFTER_SECONDS": str(TIMEOUT_SECONDS), "DEVICE_LIVENESS_INTERVAL_SECONDS": "0.5"}


def test_silent_devices_go_inactive_and_come_back_with_their_next_point(
    django_db_setup, django_db_blocker, platform_logs, operator_token
):
    with dedicated_platform(django_db_blocker, platform_logs, name="liveness", env=ENV) as running:
        with http_client(running, operator_token) as api:
            device = register_device(api, prefix="SN-LIVENESS")
            resting = register_device(api, prefix="SN-LIVENESS-MAINT")

            def send(registration) -> None:
                answer = api.post(
                    "/telemetry/point",
                    json=point_body(registration["id"]),
                    headers={"Authorization": f"Device {registration['device_token']}"},
                )
                assert answer.status_code == 202, answer.text

            def status(registration) -> dict:
                answer = api.get(f"/devices/{registration['id']}")
                assert answer.status_code == 200, answer.text
                return answer.json()

            send(resting)
            assert api.patch(f"/devices/{resting['id']}", json={"status": "maintenance"}).status_code == 200
            send(device)
            assert status(device)["status"] == "active"

            seen = wait_until(
                lambda: (row := status(device))["status"] == "inactive" and row,
                timeout=30,
                interval=0.1,
                message="the silent device to turn inactive",
            )
            silent_for = time.time() - datetime.fromisoformat(seen["last_seen"]).timestamp()
            assert silent_for >= TIMEOUT_SECONDS, f"inactive after {silent_for:.2f} s of silence"
            assert status(resting)["status"] == "maintenance"

            send(device)
            back = status(device)  # straight away, from whichever web process answers
            assert back["status"] == "active"
            assert datetime.fromisoformat(back["last_seen"]) > datetime.fromisoformat(seen["last_seen"])
            assert status(resting)["status"] == "maintenance"
