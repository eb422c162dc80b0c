"""Analytics on the live multi-process server: what was accepted over HTTP is what the figures say."""

import pytest

from iot.testing.live import register_device
from iot.testing.processes import wait_until
from iot.testing.telemetry import batch_body
from telemetry.testing import stored_points

pytestmark = pytest.mark.live


def test_message_counts_equal_the_rows_stored(api, django_db_blocker, unique_id):
    group = f"live-an-{unique_id}"
    before = api.get("/analytics/fleet").json()
    devices = [register_device(api, "SN-AN", group_id=group) for _ in range(5)]
    for n, device in enumerate(devices, start=1):
        assert api.post("/telemetry/batch", json=batch_body(device["id"], 4 * n)).status_code == 202

    def counted(device) -> int:
        return api.get(f"/analytics/devices/{device['id']}").json()["message_count"]

    for n, device in enumerate(devices, start=1):
        wait_until(lambda d=device, n=n: counted(d) == 4 * n, timeout=30, message="the device's count")
        assert counted(device) == stored_points(django_db_blocker, device["id"])
    figures = api.get(f"/analytics/groups/{group}").json()
    assert figures["device_count"] == 5 and figures["active_count"] == 5
    assert figures["total_messages"] == 4 * (1 + 2 + 3 + 4 + 5)
    after = api.get("/analytics/fleet").json()
    assert after["total_messages"] - before["total_messages"] == 60
    # The rate counts complete seconds only: poll past the one the points arrived in.
    wait_until(lambda: api.get("/analytics/fleet").json()["messages_per_second"] > 0, timeout=10, message="a rate")
    device = api.get(f"/analytics/devices/{devices[0]['id']}").json()
    assert device["uptime_seconds"] >= 0 and device["last_seen"] is not None
    assert device["average_latency_ms"] is not None and device["average_latency_ms"] >= 0
