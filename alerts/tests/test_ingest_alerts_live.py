"""Every accepted point is evaluated, over HTTP against the live multi-process server.

Rules for a group and for one device; 20 devices send violating and harmless
points concurrently through both web processes. Exactly one open alert per
(rule, device), and `occurrences` add up to the violating points accepted.
"""

import threading
import uuid

import pytest

from iot.testing.live import register_device
from iot.testing.telemetry import batch_body, point_body

pytestmark = pytest.mark.live

DEVICES = 20


def _rule(api, **scope) -> dict:
    response = api.post(
        "/alerts/rules",
        json={"metric": "temperature", "operator": "gt", "threshold": 30.0, "severity": "critical", **scope},
    )
    assert response.status_code == 201, response.text
    return response.json()


def _alerts(api, device_id: str) -> list[dict]:
    response = api.get("/alerts", params={"device_id": device_id, "limit": 100})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["results"] if isinstance(body, dict) else body


def test_concurrent_violations_give_one_alert_per_rule_and_device_with_exact_counts(api):
    group = f"grp-{uuid.uuid4().hex[:8]}"
    devices = [register_device(api, prefix="SN-ALERT", group_id=group) for _ in range(DEVICES)]
    group_rule = _rule(api, group_id=group)
    device_rule = _rule(api, device_id=devices[0]["id"])

    violating = {device["id"]: 0 for device in devices}
    lock = threading.Lock()
    statuses: list[int] = []

    def send(device: dict, round_no: int) -> None:
        # One violating point, and a batch with 3 violating of 5.
        point = api.post("/telemetry/point", json=point_body(device["id"], value=35.0 + round_no))
        body = batch_body(device["id"], 5, start_offset=-120 + round_no)
        for index, value in enumerate([31.0, 20.0, 45.0, 10.0, 30.5]):
            body["points"][index]["value"] = value
        batch = api.post("/telemetry/batch", json=body)
        with lock:
            statuses.extend([point.status_code, batch.status_code])
            violating[device["id"]] += (point.status_code == 202) + 3 * (batch.status_code == 202)

    threads = [threading.Thread(target=send, args=(device, n)) for n in range(3) for device in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [202] * len(statuses)

    for device in devices:
        alerts = [a for a in _alerts(api, device["id"]) if a["status"] in ("open", "acknowledged")]
        by_rule = {}
        for alert in alerts:
            assert alert["rule_id"] not in by_rule, f"two open alerts for one (rule, device): {alerts}"
            by_rule[alert["rule_id"]] = alert
        expected_rules = {group_rule["id"]} | ({device_rule["id"]} if device is devices[0] else set())
        assert set(by_rule) == expected_rules
        for alert in by_rule.values():
            assert alert["occurrences"] == violating[device["id"]] == 12

    # Resolve, then the next violation opens a new alert; the resolved one stays resolved.
    first = next(a for a in _alerts(api, devices[1]["id"]) if a["status"] == "open")
    assert api.post(f"/alerts/{first['id']}/resolve").status_code == 200
    assert api.post(f"/alerts/{first['id']}/acknowledge").status_code == 409
    assert api.post("/telemetry/point", json=point_body(devices[1]["id"], value=99.0)).status_code == 202
    current = [a for a in _alerts(api, devices[1]["id"]) if a["status"] == "open"]
    assert len(current) == 1 and current[0]["id"] != first["id"] and current[0]["occurrences"] == 1
