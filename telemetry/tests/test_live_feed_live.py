"""The WebSocket live feed `ws/telemetry/{device_id}` against the running uvicorn server.

Points go HTTP -> Postgres -> event queue -> consumer process -> Channels layer
-> the socket; the test receives with a timeout (no sleeps).
"""

import json
import uuid

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from telemetry.tests.conftest import batch_body, point_body, register_device

pytestmark = pytest.mark.live

RECEIVE_TIMEOUT = 20


def ws_url(platform, device_id: str) -> str:
    return platform.base_url.replace("http://", "ws://") + f"/ws/telemetry/{device_id}"


def receive_points(ws, count: int) -> list[dict]:
    points: list[dict] = []
    while len(points) < count:
        message = json.loads(ws.recv(timeout=RECEIVE_TIMEOUT))
        assert message["type"] == "telemetry.points"
        points += message["points"]
    return points


def close_code(platform, device_id: str, headers: dict | None) -> int:
    with connect(ws_url(platform, device_id), additional_headers=headers or {}, proxy=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=RECEIVE_TIMEOUT)
    return closed.value.rcvd.code


def test_operator_receives_points_as_they_are_stored(platform, api, operator_token):
    device = register_device(api, "SN-LIVE")
    headers = {"Authorization": f"Token {operator_token}"}
    with connect(ws_url(platform, device["id"]), additional_headers=headers, proxy=None) as ws:
        assert api.post("/telemetry/point", json=point_body(device["id"], value=42.5)).status_code == 202
        (point,) = receive_points(ws, 1)
        assert point["metric"] == "temperature" and point["value"] == 42.5

        assert api.post("/telemetry/batch", json=batch_body(device["id"], 5, metric="rpm")).status_code == 202
        batch = receive_points(ws, 5)
        assert [p["value"] for p in batch] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert {p["metric"] for p in batch} == {"rpm"}


def test_device_watches_itself_with_its_token(platform, api):
    device = register_device(api, "SN-LIVE")
    headers = {"Authorization": f"Device {device['device_token']}"}
    with connect(ws_url(platform, device["id"]), additional_headers=headers, proxy=None) as ws:
        assert api.post("/telemetry/point", json=point_body(device["id"], value=7.0)).status_code == 202
        assert receive_points(ws, 1)[0]["value"] == 7.0


def test_browser_style_token_query_parameter(platform, api, operator_token):
    device = register_device(api, "SN-LIVE")
    url = ws_url(platform, device["id"]) + f"?token={operator_token}"
    with connect(url, proxy=None) as ws:
        assert api.post("/telemetry/point", json=point_body(device["id"], value=3.0)).status_code == 202
        assert receive_points(ws, 1)[0]["value"] == 3.0


def test_only_the_watched_device_is_streamed(platform, api, operator_token):
    watched, other = register_device(api, "SN-LIVE"), register_device(api, "SN-LIVE")
    headers = {"Authorization": f"Token {operator_token}"}
    with connect(ws_url(platform, watched["id"]), additional_headers=headers, proxy=None) as ws:
        assert api.post("/telemetry/point", json=point_body(other["id"], value=1.0)).status_code == 202
        assert api.post("/telemetry/point", json=point_body(watched["id"], value=2.0)).status_code == 202
        message = json.loads(ws.recv(timeout=RECEIVE_TIMEOUT))
        assert message["device_id"] == watched["id"]
        assert [p["value"] for p in message["points"]] == [2.0]


def test_refusals_close_with_a_reason_code(platform, api, operator_token):
    device, other = register_device(api, "SN-LIVE"), register_device(api, "SN-LIVE")
    assert close_code(platform, device["id"], None) == 4401
    assert close_code(platform, device["id"], {"Authorization": "Token not-a-token"}) == 4401
    assert close_code(platform, other["id"], {"Authorization": f"Device {device['device_token']}"}) == 4403
    operator = {"Authorization": f"Token {operator_token}"}
    assert close_code(platform, str(uuid.uuid4()), operator) == 4404
    assert close_code(platform, "not-a-uuid", operator) == 4404
