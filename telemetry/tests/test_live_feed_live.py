"""The WebSocket live feed `ws/telemetry/{device_id}` against the running uvicorn server.

Points go HTTP -> Postgres -> event queue -> consumer process -> Channels layer
-> the socket; the test receives with a timeout (no sleeps). The last tests hold
a feed idle past every Redis socket timeout, and break its layer connection.
"""

import json
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from iot.redis import get_redis
from iot.testing.live import dedicated_platform, register_device
from iot.testing.processes import http_client
from iot.testing.telemetry import batch_body, point_body

pytestmark = pytest.mark.live

RECEIVE_TIMEOUT = 20
CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 registry: a temporary server condition; the client should reconnect


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


# --- Idle feeds and a failing channel layer ------------------------------------------------------
# A platform of its own with a 1 s Redis socket timeout keeps these tests quick. The idle period is
# longer than every socket timeout the feed runs with: REDIS_SOCKET_TIMEOUT (1 s here) and redis-py's
# 5 s default, which the Channels layer fell back on before its hosts were configured.
SHORT_SOCKET_TIMEOUT = "1"
IDLE_SECONDS = 6.5
LAYER_FAILURE_DEADLINE = 20


@pytest.fixture(scope="module")
def short_timeout_platform(django_db_setup, django_db_blocker, platform_logs):
    env = {"REDIS_SOCKET_TIMEOUT": SHORT_SOCKET_TIMEOUT}
    with dedicated_platform(django_db_blocker, platform_logs, name="ws-short-timeout", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def short_timeout_api(short_timeout_platform, operator_token):
    with http_client(short_timeout_platform, operator_token) as client:
        yield client


def test_idle_feed_outlives_every_socket_timeout(short_timeout_platform, short_timeout_api, operator_token):
    device = register_device(short_timeout_api, "SN-LIVE")
    headers = {"Authorization": f"Token {operator_token}"}
    with connect(ws_url(short_timeout_platform, device["id"]), additional_headers=headers, proxy=None) as ws:
        # Nothing is sent for the whole period; a closed socket raises ConnectionClosed here instead.
        with pytest.raises(TimeoutError):
            ws.recv(timeout=IDLE_SECONDS)
        response = short_timeout_api.post("/telemetry/point", json=point_body(device["id"], value=11.5))
        assert response.status_code == 202
        assert receive_points(ws, 1)[0]["value"] == 11.5


def _kill_blocked_layer_connections(platform) -> int:
    """CLIENT KILL the platform's Channels-layer connections that are waiting in BZPOPMIN (a Redis blip)."""
    client = get_redis()
    name = f"{platform.env['REDIS_KEY_PREFIX']}:channels"
    database = client.connection_pool.connection_kwargs.get("db", 0)
    killed = 0
    for entry in client.client_list():
        if entry.get("name") == name and int(entry["db"]) == int(database) and "b" in entry["flags"]:
            killed += client.client_kill_filter(_id=entry["id"])
    return killed


def test_a_channel_layer_failure_closes_the_feed_so_the_client_reconnects(
    short_timeout_platform, short_timeout_api, operator_token
):
    device = register_device(short_timeout_api, "SN-LIVE")
    url, headers = ws_url(short_timeout_platform, device["id"]), {"Authorization": f"Token {operator_token}"}
    with connect(url, additional_headers=headers, proxy=None) as ws:
        deadline = time.monotonic() + LAYER_FAILURE_DEADLINE
        closed = None
        while closed is None:
            assert time.monotonic() < deadline, "the feed stayed open after its channel-layer connection was killed"
            _kill_blocked_layer_connections(short_timeout_platform)
            try:
                ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                closed = exc
        assert closed.rcvd is not None, "closed without a close frame"
        assert closed.rcvd.code == CLOSE_TRY_AGAIN_LATER

    # The client reconnects and the feed works again.
    with connect(url, additional_headers=headers, proxy=None) as ws:
        response = short_timeout_api.post("/telemetry/point", json=point_body(device["id"], value=12.5))
        assert response.status_code == 202
        assert receive_points(ws, 1)[0]["value"] == 12.5
