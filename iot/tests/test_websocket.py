"""The WebSocket login (`iot.websocket`) is the HTTP API's: the configured DRF authentication classes.

Through the middleware alone (what it puts in `scope["principal"]`) and through the
composed ASGI application (`iot.asgi`), whose consumer turns a missing principal into 4401.
The middleware's database work runs in the test's thread (asgiref's thread-sensitive
mode), whose connection it closes: hence transactional tests.
"""

import uuid

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.authtoken.models import Token

from devices.models import DeviceStatus
from devices.services import device_register, device_update
from iot.websocket import WebSocketAuthMiddleware

pytestmark = pytest.mark.django_db(transaction=True)

AUTH_CLASSES = "DEFAULT_AUTHENTICATION_CLASSES"


def principal(headers: dict[str, str] | None = None, query: str = ""):
    """What the middleware hands the consumer for a handshake with these headers and query string."""
    seen = {}

    async def consumer(scope, receive, send):
        seen["principal"] = scope["principal"]

    scope = {
        "type": "websocket",
        "path": "/ws/telemetry/x",
        "headers": [(name.lower().encode(), value.encode("latin-1")) for name, value in (headers or {}).items()],
        "query_string": query.encode(),
    }
    async_to_sync(WebSocketAuthMiddleware(consumer))(scope, None, None)
    return seen["principal"]


def operator(*, active: bool = True) -> tuple[object, str]:
    user = get_user_model().objects.create_user(username=f"ws-{uuid.uuid4().hex[:8]}", is_active=active)
    return user, Token.objects.create(user=user).key


def device():
    return device_register(serial_number=f"SN-WS-{uuid.uuid4().hex}", device_type="sensor", firmware_version="1")


def test_an_operator_token_in_the_header_or_the_query_is_the_operator():
    user, key = operator()
    assert principal({"Authorization": f"Token {key}"}).pk == user.pk
    assert principal(query=f"token={key}").pk == user.pk
    # The header, when sent, is the credential: a bad one is not rescued by the query.
    assert principal({"Authorization": "Token wrong"}, query=f"token={key}") is None


def test_a_device_token_is_the_device_itself():
    registration = device()
    seen = principal({"Authorization": f"Device {registration.device_token}"})
    assert seen.is_device and seen.device_id == registration.device.pk


def test_refused_or_missing_credentials_leave_no_principal():
    registration = device()
    _, inactive_key = operator(active=False)
    _, key = operator()
    device_update(device_id=registration.device.pk, changes={"status": DeviceStatus.DECOMMISSIONED})
    for headers in (
        None,
        {"Authorization": "Token not-a-token"},
        {"Authorization": f"Bearer {key}"},
        {"Authorization": f"Token {key} extra"},
        {"Authorization": "Device not-a-token"},
        {"Authorization": f"Token {inactive_key}"},
        {"Authorization": f"Device {registration.device_token}"},  # decommissioned
    ):
        assert principal(headers) is None, headers


def test_a_logged_in_session_is_no_websocket_login():
    # A browser sends its cookies with a cross-site handshake too: the session must not count.
    user, _ = operator()
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    assert principal({"Cookie": cookie}) is None


def test_the_login_runs_the_configured_authentication_classes(settings):
    registration = device()
    _, key = operator()
    credential = {"Authorization": f"Device {registration.device_token}"}
    assert principal(credential) is not None
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        AUTH_CLASSES: [c for c in settings.REST_FRAMEWORK[AUTH_CLASSES] if not c.startswith("devices.")],
    }
    assert principal(credential) is None
    assert principal({"Authorization": f"Token {key}"}) is not None


def close_code(path: str, headers: dict[str, str]) -> int:
    """The close code the composed application answers a refused handshake with."""
    from iot.asgi import application

    async def run() -> int:
        scope = {
            "type": "websocket",
            "path": path,
            "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
            "query_string": b"",
            "subprotocols": [],
        }
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "websocket.connect"})
        # Refusals are accepted first, so that the client gets the code.
        assert (await communicator.receive_output(timeout=10))["type"] == "websocket.accept"
        message = await communicator.receive_output(timeout=10)
        assert message["type"] == "websocket.close"
        await communicator.send_input({"type": "websocket.disconnect", "code": message["code"]})
        # Up to half REDIS_SOCKET_TIMEOUT: the consumer's pending channel-layer receive finishes first.
        await communicator.wait(timeout=10)
        return message["code"]

    return async_to_sync(run)()


def test_the_feed_closes_4401_for_a_decommissioned_device():
    registration = device()
    path = f"/ws/telemetry/{registration.device.pk}"
    other = f"/ws/telemetry/{device().device.pk}"
    credential = {"Authorization": f"Device {registration.device_token}"}
    assert close_code(other, credential) == 4403  # authenticated: the refusal is about the device watched
    device_update(device_id=registration.device.pk, changes={"status": DeviceStatus.DECOMMISSIONED})
    assert close_code(path, credential) == 4401
