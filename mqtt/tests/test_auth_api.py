"""`POST /mqtt/auth` and `POST /mqtt/acl`: what the broker is told, for every kind of login and topic."""

import uuid

import orjson
import pytest
from prometheus_client import REGISTRY

from devices.models import DeviceStatus
from devices.services import device_delete, device_update
from devices.testing import device_create
from mqtt import topics
from mqtt.authentication import HEADER

pytestmark = pytest.mark.django_db

SECRET = "broker-secret-for-tests"
BRIDGE_PASSWORD = "bridge-password-for-tests"
SECRET_META = {"HTTP_X_MQTT_AUTH_SECRET": SECRET}


@pytest.fixture(autouse=True)
def mqtt_settings(settings, redis_namespace):
    settings.MQTT_AUTH_SECRET = SECRET
    settings.MQTT_BRIDGE_USERNAME = "iot-bridge"
    settings.MQTT_BRIDGE_PASSWORD = BRIDGE_PASSWORD
    return settings


@pytest.fixture
def device():
    registration = device_create(serial_prefix="SN-MQTT-AUTH")
    return registration.device, registration.device_token


def post(client, path: str, body, *, meta=SECRET_META):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, data, content_type="application/json", **meta)


def auth(client, username, password, clientid="c1"):
    response = post(client, "/mqtt/auth", {"username": username, "password": password, "clientid": clientid})
    assert response.status_code == 200, response.content
    return response.json()


def acl(client, username, topic, action):
    response = post(client, "/mqtt/acl", {"username": username, "clientid": "c1", "topic": topic, "action": action})
    assert response.status_code == 200, response.content
    return response.json()["result"]


def counted(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(f"{name}_total", labels) or 0.0


# --- /mqtt/auth --------------------------------------------------------------------------------------


def test_a_device_logs_in_with_its_id_and_token(client, device):
    dev, token = device
    allowed_before = counted("iot_mqtt_auth", result="allow")
    assert auth(client, str(dev.pk), token) == {"result": "allow", "is_superuser": False}
    assert auth(client, str(dev.pk).upper(), token)["result"] == "allow"  # a UUID in any case names it
    assert counted("iot_mqtt_auth", result="allow") == allowed_before + 2


def test_a_wrong_token_someone_elses_token_or_no_token_is_refused(client, device):
    dev, token = device
    other = device_create(serial_prefix="SN-MQTT-AUTH")
    denied_before = counted("iot_mqtt_auth", result="deny")
    assert auth(client, str(dev.pk), token + "x")["result"] == "deny"
    assert auth(client, str(dev.pk), other.device_token)["result"] == "deny"  # a valid token, of another device
    assert auth(client, str(other.device.pk), token)["result"] == "deny"
    assert auth(client, str(dev.pk), "")["result"] == "deny"
    assert counted("iot_mqtt_auth", result="deny") == denied_before + 4


@pytest.mark.parametrize("username", ["", "not-a-uuid", "devices/1", "0" * 40, "iot-bridge-2"])
def test_a_username_that_is_no_device_id_is_refused_not_an_error(client, device, username):
    assert auth(client, username, device[1]) == {"result": "deny", "is_superuser": False}


def test_a_decommissioned_device_is_refused_at_once(client, device):
    dev, token = device
    assert auth(client, str(dev.pk), token)["result"] == "allow"  # its token and row are now cached
    device_update(device_id=dev.pk, changes={"status": DeviceStatus.DECOMMISSIONED})
    assert auth(client, str(dev.pk), token)["result"] == "deny"


def test_a_deleted_device_its_token_revoked_is_refused_at_once(client, device):
    dev, token = device
    assert auth(client, str(dev.pk), token)["result"] == "allow"
    device_delete(device_id=dev.pk)
    assert auth(client, str(dev.pk), token)["result"] == "deny"


def test_the_bridge_account_is_a_superuser_with_its_password_only(client, mqtt_settings):
    assert auth(client, "iot-bridge", BRIDGE_PASSWORD) == {"result": "allow", "is_superuser": True}
    assert auth(client, "iot-bridge", BRIDGE_PASSWORD[:-1])["result"] == "deny"
    assert auth(client, "iot-bridge", BRIDGE_PASSWORD + "x")["result"] == "deny"
    assert auth(client, "iot-bridge", "")["result"] == "deny"
    mqtt_settings.MQTT_BRIDGE_PASSWORD = ""  # no password configured: the account does not exist
    assert auth(client, "iot-bridge", "")["result"] == "deny"
    assert acl(client, "iot-bridge", "devices/+/telemetry", "subscribe") == "deny"


# --- /mqtt/acl ---------------------------------------------------------------------------------------

OWN_PUBLISH = [topics.TELEMETRY, topics.OTA_STATUS, topics.STATUS]
OWN_SUBSCRIBE = [topics.OTA, topics.ERRORS]


@pytest.mark.parametrize("action", ["publish", "subscribe"])
@pytest.mark.parametrize("kind", [topics.TELEMETRY, topics.OTA_STATUS, topics.STATUS, topics.OTA, topics.ERRORS])
def test_a_device_may_publish_and_subscribe_to_exactly_its_own_topics(client, device, action, kind):
    dev, _ = device
    expected = "allow" if kind in (OWN_PUBLISH if action == "publish" else OWN_SUBSCRIBE) else "deny"
    assert acl(client, str(dev.pk), topics.device_topic(dev.pk, kind), action) == expected
    other = uuid.uuid4()
    assert acl(client, str(dev.pk), topics.device_topic(other, kind), action) == "deny"


@pytest.mark.parametrize(
    "pattern",
    [
        "devices/{id}/#",
        "devices/{id}/+",
        "devices/+/ota",
        "devices/#",
        "#",
        "+/{id}/ota",
        "devices/{id}/ota/",
        "devices/{id}/ota/#",
        "devices/{upper}/ota",
        "$share/g/devices/{id}/ota",
        "/devices/{id}/ota",
    ],
)
def test_wildcards_and_near_misses_of_its_own_topics_are_refused(client, device, pattern):
    dev, _ = device
    topic = pattern.format(id=dev.pk, upper=str(dev.pk).upper())
    assert acl(client, str(dev.pk), topic, "subscribe") == "deny"
    assert acl(client, str(dev.pk), topic, "publish") == "deny"


def test_a_decommissioned_or_deleted_device_may_use_no_topic(client, device):
    dev, _ = device
    own = topics.device_topic(dev.pk, topics.TELEMETRY)
    assert acl(client, str(dev.pk), own, "publish") == "allow"
    device_update(device_id=dev.pk, changes={"status": DeviceStatus.DECOMMISSIONED})
    assert acl(client, str(dev.pk), own, "publish") == "deny"
    assert acl(client, str(dev.pk), topics.device_topic(dev.pk, topics.OTA), "subscribe") == "deny"
    device_delete(device_id=dev.pk)
    assert acl(client, str(dev.pk), own, "publish") == "deny"


def test_an_unknown_device_id_or_a_name_may_use_no_topic(client):
    unknown = uuid.uuid4()
    assert acl(client, str(unknown), topics.device_topic(unknown, topics.TELEMETRY), "publish") == "deny"
    assert acl(client, "someone", "devices/someone/telemetry", "publish") == "deny"


@pytest.mark.parametrize("topic", ["#", "devices/+/telemetry", "$share/bridges/devices/+/telemetry", "anything"])
def test_the_bridge_account_may_use_every_topic(client, topic):
    denied_before = counted("iot_mqtt_acl", action="subscribe", result="deny")
    assert acl(client, "iot-bridge", topic, "subscribe") == "allow"
    assert acl(client, "iot-bridge", topic, "publish") == "allow"
    assert counted("iot_mqtt_acl", action="subscribe", result="deny") == denied_before


def test_acl_answers_are_counted_by_action_and_result(client, device):
    dev, _ = device
    before = {
        (action, result): counted("iot_mqtt_acl", action=action, result=result)
        for action in ("publish", "subscribe")
        for result in ("allow", "deny")
    }
    acl(client, str(dev.pk), topics.device_topic(dev.pk, topics.TELEMETRY), "publish")
    acl(client, str(dev.pk), topics.device_topic(dev.pk, topics.TELEMETRY), "subscribe")
    acl(client, str(dev.pk), "#", "subscribe")
    assert counted("iot_mqtt_acl", action="publish", result="allow") == before[("publish", "allow")] + 1
    assert counted("iot_mqtt_acl", action="subscribe", result="deny") == before[("subscribe", "deny")] + 2
    assert counted("iot_mqtt_acl", action="publish", result="deny") == before[("publish", "deny")]


# --- only the broker may ask, and only well-formed questions --------------------------------------


@pytest.mark.parametrize("path", ["/mqtt/auth", "/mqtt/acl"])
def test_without_the_brokers_secret_the_answer_is_401(client, device, path, mqtt_settings):
    body = {"username": str(device[0].pk), "password": device[1], "clientid": "c", "topic": "t", "action": "publish"}
    missing = post(client, path, body, meta={})
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"] == HEADER
    assert HEADER in missing.json()["detail"]
    wrong = post(client, path, body, meta={"HTTP_X_MQTT_AUTH_SECRET": SECRET + "x"})
    assert wrong.status_code == 401 and "Wrong" in wrong.json()["detail"]
    as_device = post(client, path, body, meta={"HTTP_AUTHORIZATION": f"Device {device[1]}"})
    assert as_device.status_code == 401  # a device's own credential is no broker's
    mqtt_settings.MQTT_AUTH_SECRET = ""  # unset on the server: nobody may ask, whatever is sent
    for meta in ({"HTTP_X_MQTT_AUTH_SECRET": ""}, SECRET_META):
        refused = post(client, path, body, meta=meta)
        assert refused.status_code == 401 and "MQTT_AUTH_SECRET is not set" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/mqtt/auth", b'{"username": "x", "password": ', "detail"),
        ("/mqtt/auth", b"[1, 2]", "non_field_errors"),
        ("/mqtt/auth", {"username": "x", "clientid": "c"}, "password"),
        ("/mqtt/auth", {"username": None, "password": "p", "clientid": "c"}, "username"),
        ("/mqtt/acl", b"not json", "detail"),
        ("/mqtt/acl", {"username": "x", "clientid": "c", "topic": "t"}, "action"),
        ("/mqtt/acl", {"username": "x", "clientid": "c", "topic": "t", "action": "all"}, "action"),
        ("/mqtt/acl", {"username": "x", "clientid": "c", "topic": "", "action": "publish"}, "topic"),
        ("/mqtt/acl", {"username": "x", "clientid": "c", "topic": "t" * 65536, "action": "publish"}, "topic"),
    ],
)
def test_a_malformed_question_is_a_400_that_says_what_is_wrong(client, path, body, field):
    response = post(client, path, body)
    assert response.status_code == 400
    assert field in response.json()
    if field == "detail":
        assert "JSON parse error" in response.json()["detail"]


def test_extra_fields_of_an_emqx_body_template_are_ignored(client, device):
    dev, token = device
    body = {"username": str(dev.pk), "password": token, "clientid": "c", "peerhost": "10.0.0.7", "proto_name": "MQTT"}
    response = post(client, "/mqtt/auth", body)
    assert response.status_code == 200 and response.json()["result"] == "allow"


def test_the_paths_answer_with_a_trailing_slash_too(client, device):
    dev, token = device
    response = post(client, "/mqtt/auth/", {"username": str(dev.pk), "password": token, "clientid": "c"})
    assert response.status_code == 200 and response.json()["result"] == "allow"
