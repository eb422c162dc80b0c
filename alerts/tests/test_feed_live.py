"""The operators' alert feed `ws/alerts` against the running multi-process server.

Alerts go: point over HTTP -> evaluated in the ingest transaction -> after commit an
`alerts.changed` event -> a consumer process -> the Channels layer -> the socket. The
test receives with a timeout (no sleeps).
"""

import json
import uuid

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from iot.testing.live import register_device
from iot.testing.telemetry import point_body

pytestmark = pytest.mark.live

RECEIVE_TIMEOUT = 20


def feed_url(platform, query: str = "") -> str:
    return platform.base_url.replace("http://", "ws://") + "/ws/alerts" + (f"?{query}" if query else "")


def receive_event(ws, event: str) -> dict:
    """The next message of this `event` (others, from other tests' alerts, are skipped)."""
    while True:
        message = json.loads(ws.recv(timeout=RECEIVE_TIMEOUT))
        assert message["type"] == "alerts.event"
        if message["event"] == event:
            return message


def alert_of(message: dict, device_id: str) -> dict | None:
    return next((alert for alert in message["alerts"] if alert["device_id"] == device_id), None)


def wait_for_alert(ws, event: str, device_id: str) -> tuple[dict, dict]:
    while True:
        message = receive_event(ws, event)
        alert = alert_of(message, device_id)
        if alert is not None:
            return message, alert


def test_an_operator_sees_alerts_open_acknowledged_and_resolved(platform, api, operator_token):
    group = f"feed-{uuid.uuid4().hex[:8]}"
    device = register_device(api, "SN-FEED", group_id=group)
    rule = api.post(
        "/alerts/rules", json={"group_id": group, "metric": "temperature", "operator": "gt", "threshold": 50}
    ).json()
    headers = {"Authorization": f"Token {operator_token}"}
    with connect(feed_url(platform), additional_headers=headers, proxy=None) as ws:
        assert api.post("/telemetry/point", json=point_body(device["id"], value=75.0)).status_code == 202
        message, alert = wait_for_alert(ws, "alert.opened", device["id"])
        assert message["event_id"]
        assert alert["rule_id"] == rule["id"] and alert["last_value"] == 75.0 and alert["group_id"] == group

        assert api.post(f"/alerts/{alert['id']}/acknowledge").status_code == 200
        _, acknowledged = wait_for_alert(ws, "alert.acknowledged", device["id"])
        assert acknowledged["id"] == alert["id"] and acknowledged["status"] == "acknowledged"

        # A repeated violation of the acknowledged alert counts in it but is not pushed as a new alert.
        assert api.post("/telemetry/point", json=point_body(device["id"], value=80.0)).status_code == 202
        assert api.post(f"/alerts/{alert['id']}/resolve").status_code == 200
        _, resolved = wait_for_alert(ws, "alert.resolved", device["id"])
        assert resolved["status"] == "resolved" and resolved["occurrences"] == 2


def test_filters_by_severity_device_and_group(platform, api, operator_token):
    group = f"feed-{uuid.uuid4().hex[:8]}"
    watched, other = register_device(api, "SN-FEED", group_id=group), register_device(api, "SN-FEED")
    for device_id, severity in ((watched["id"], "critical"), (other["id"], "info")):
        api.post(
            "/alerts/rules",
            json={
                "device_id": device_id,
                "metric": "temperature",
                "operator": "gt",
                "threshold": 0,
                "severity": severity,
            },
        ).raise_for_status()
    headers = {"Authorization": f"Token {operator_token}"}
    queries = ["severity=critical", f"device_id={watched['id']}", f"group_id={group}"]
    sockets = [connect(feed_url(platform, query), additional_headers=headers, proxy=None) for query in queries]
    try:
        # The other device's alert first: a filtered feed must skip it and deliver only the watched one's.
        assert api.post("/telemetry/point", json=point_body(other["id"], value=1.0)).status_code == 202
        assert api.post("/telemetry/point", json=point_body(watched["id"], value=1.0)).status_code == 202
        for ws in sockets:
            message = receive_event(ws, "alert.opened")
            while alert_of(message, watched["id"]) is None:
                assert alert_of(message, other["id"]) is None, "a filtered feed delivered an unwanted alert"
                message = receive_event(ws, "alert.opened")
            assert alert_of(message, other["id"]) is None
    finally:
        for ws in sockets:
            ws.close()


@pytest.mark.parametrize(
    ("credential", "query", "code"),
    [
        (None, "", 4401),
        ("bogus", "", 4401),
        ("device", "", 4403),
        ("operator", "severity=catastrophic", 4400),
        ("operator", "device_id=not-a-uuid", 4400),
    ],
)
def test_refusals_say_why(platform, api, operator_token, credential, query, code):
    headers = {}
    if credential == "operator":
        headers = {"Authorization": f"Token {operator_token}"}
    elif credential == "bogus":
        headers = {"Authorization": "Token " + "0" * 40}
    elif credential == "device":
        headers = {"Authorization": f"Device {register_device(api, 'SN-FEED')['device_token']}"}
    with connect(feed_url(platform, query), additional_headers=headers, proxy=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=RECEIVE_TIMEOUT)
    assert closed.value.rcvd.code == code
