"""The alerts HTTP API in-process (Django's test client): rules, transitions (409s), silences, bad input."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from alerts.models import Alert, AlertRule, AlertRuleChannel, NotificationChannel, Silence
from alerts.testing import points_evaluate, rule_create
from devices.testing import device_create
from iot.testing.factories import operator_token_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client):
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {operator_token_create().key}"
    return client


@pytest.fixture
def device():
    return device_create(serial_prefix="ALERT-API", group_id="api-group").device


def post(client, path, body=None):
    return client.post(path, body if body is not None else {}, content_type="application/json")


def patch(client, path, body):
    return client.patch(path, body, content_type="application/json")


# --- Rules ---------------------------------------------------------------------------------------


def test_rule_lifecycle(operator, device):
    channel = NotificationChannel.objects.create(name="ops", url="https://hooks.example.com/x")
    created = post(
        operator,
        "/alerts/rules",
        {
            "device_id": str(device.pk),
            "metric": "temperature",
            "operator": "gt",
            "threshold": 80,
            "severity": "critical",
            "channel_ids": [str(channel.pk)],
        },
    )
    assert created.status_code == 201, created.content
    rule = created.json()
    assert (rule["device_id"], rule["group_id"], rule["threshold"], rule["severity"]) == (
        str(device.pk),
        None,
        80.0,
        "critical",
    )
    assert rule["channel_ids"] == [str(channel.pk)] and rule["enabled"] is True and rule["version"] == 1
    path = f"/alerts/rules/{rule['id']}"
    assert operator.get(path).json() == rule
    assert [r["id"] for r in operator.get("/alerts/rules", {"device_id": str(device.pk)}).json()["results"]] == [
        rule["id"]
    ]
    changed = patch(operator, path, {"threshold": 90.5, "enabled": False, "channel_ids": []})
    assert changed.status_code == 200, changed.content
    assert (changed.json()["threshold"], changed.json()["enabled"], changed.json()["channel_ids"]) == (90.5, False, [])
    assert changed.json()["version"] == 2
    assert operator.delete(path).status_code == 204
    assert operator.get(path).status_code == 404
    assert operator.delete(path).status_code == 404


def test_group_rule_and_list_filters(operator, device):
    body = {"group_id": "api-group", "metric": "cpu/load", "operator": "gte", "threshold": 0.9}
    created = post(operator, "/alerts/rules", body)
    assert created.status_code == 201, created.content
    assert created.json()["severity"] == "warning"  # the default
    listed = operator.get("/alerts/rules", {"group_id": "api-group", "enabled": "true"}).json()["results"]
    assert [r["id"] for r in listed] == [created.json()["id"]]
    assert operator.get("/alerts/rules", {"group_id": "api-group", "enabled": "false"}).json()["results"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"metric": "t", "operator": "gt", "threshold": 1}, "non_field_errors"),  # no target
        ({"device_id": "D", "group_id": "g", "metric": "t", "operator": "gt", "threshold": 1}, "non_field_errors"),
        ({"group_id": "g", "metric": "t", "operator": "gt", "threshold": 1, "colour": "red"}, "colour"),
        ({"group_id": "g", "metric": "bad metric", "operator": "gt", "threshold": 1}, "metric"),
        ({"group_id": "g", "metric": "t\n", "operator": "gt", "threshold": 1}, "metric"),
        ({"group_id": "g", "metric": "t", "operator": ">", "threshold": 1}, "operator"),
        ({"group_id": "g", "metric": "t", "operator": "gt", "threshold": "1"}, "threshold"),
        ({"group_id": "g", "metric": "t", "operator": "gt", "threshold": True}, "threshold"),
        ({"group_id": "g", "metric": "t", "operator": "gt", "threshold": 1, "severity": "fatal"}, "severity"),
        ({"group_id": "g", "metric": "t", "operator": "gt", "threshold": 1, "enabled": "yes"}, "enabled"),
        ({"group_id": "g", "metric": "t", "operator": "gt", "threshold": 1, "channel_ids": ["x"]}, "channel_ids"),
        ({"device_id": 123, "metric": "t", "operator": "gt", "threshold": 1}, "device_id"),
        ({"group_id": "g" * 129, "metric": "t", "operator": "gt", "threshold": 1}, "group_id"),
    ],
)
def test_bad_rules_are_400_and_store_nothing(operator, device, body, field):
    body = {name: (str(device.pk) if value == "D" else value) for name, value in body.items()}
    response = post(operator, "/alerts/rules", body)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not AlertRule.objects.exists()


def test_unknown_device_or_channel_is_422_and_stores_nothing(operator, device):
    rule = {"metric": "t", "operator": "gt", "threshold": 1}
    response = post(operator, "/alerts/rules", {**rule, "device_id": str(uuid.uuid4())})
    assert response.status_code == 422 and "device_id" in response.json()
    missing = str(uuid.uuid4())
    response = post(operator, "/alerts/rules", {**rule, "device_id": str(device.pk), "channel_ids": [missing]})
    assert response.status_code == 422 and missing in response.json()["channel_ids"][0]
    assert not AlertRule.objects.exists() and not AlertRuleChannel.objects.exists()


def test_patch_refuses_a_new_target_an_empty_body_and_unknown_channels(operator, device):
    rule = rule_create(device_id=device.pk)
    path = f"/alerts/rules/{rule.pk}"
    assert "device_id" in patch(operator, path, {"device_id": str(device.pk)}).json()
    assert patch(operator, path, {"group_id": "x"}).status_code == 400
    assert patch(operator, path, {}).status_code == 400
    unknown = patch(operator, path, {"threshold": 1.0, "channel_ids": [str(uuid.uuid4())]})
    assert unknown.status_code == 422
    assert AlertRule.objects.get(pk=rule.pk).threshold == 50.0  # the threshold change rolled back with it
    assert patch(operator, f"/alerts/rules/{uuid.uuid4()}", {"threshold": 1.0}).status_code == 404
    assert patch(operator, "/alerts/rules/not-a-uuid", {"threshold": 1.0}).status_code == 404


def test_operators_only(client, device):
    assert client.get("/alerts/rules").status_code == 401
    registration = device_create()
    client.defaults["HTTP_AUTHORIZATION"] = f"Device {registration.device_token}"
    assert client.get("/alerts").status_code == 403
    rule = {"group_id": "g", "metric": "t", "operator": "gt", "threshold": 1}
    assert post(client, "/alerts/rules", rule).status_code == 403


# --- Alerts --------------------------------------------------------------------------------------


@pytest.fixture
def alert(device) -> Alert:
    rule_create(device_id=device.pk, threshold=50.0)
    [alert_id] = points_evaluate(device_id=device.pk, values=[60.0, 70.0]).created
    return Alert.objects.get(pk=alert_id)


def test_list_and_read_alerts(operator, device, alert):
    listed = operator.get("/alerts", {"device_id": str(device.pk), "status": "open"}).json()["results"]
    assert [a["id"] for a in listed] == [str(alert.pk)]
    body = operator.get(f"/alerts/{alert.pk}").json()
    assert (body["occurrences"], body["first_value"], body["last_value"], body["status"]) == (2, 60.0, 70.0, "open")
    assert operator.get("/alerts", {"status": "resolved", "device_id": str(device.pk)}).json()["results"] == []
    assert operator.get("/alerts", {"status": "closed"}).status_code == 400
    assert operator.get("/alerts", {"device_id": "nope"}).status_code == 400
    assert operator.get("/alerts", {"limit": "0"}).status_code == 400
    assert operator.get("/alerts", {"cursor": "%%%"}).status_code == 400
    assert operator.get(f"/alerts/{uuid.uuid4()}").status_code == 404
    assert operator.get("/alerts/not-a-uuid").status_code == 404


def test_transitions_and_their_409s(operator, device, alert):
    path = f"/alerts/{alert.pk}"
    acknowledged = post(operator, f"{path}/acknowledge")
    assert acknowledged.status_code == 200, acknowledged.content
    assert acknowledged.json()["status"] == "acknowledged" and acknowledged.json()["acknowledged_by"]
    again = post(operator, f"{path}/acknowledge")
    assert again.status_code == 409
    assert again.json()["code"] == "invalid_transition" and again.json()["status"] == "acknowledged"
    resolved = post(operator, f"{path}/resolve")
    assert resolved.status_code == 200 and resolved.json()["status"] == "resolved"
    assert resolved.json()["resolved_at"] and resolved.json()["acknowledged_at"]
    for verb in ("acknowledge", "resolve"):
        refused = post(operator, f"{path}/{verb}")
        assert refused.status_code == 409 and refused.json()["status"] == "resolved", refused.content
    assert post(operator, f"/alerts/{uuid.uuid4()}/resolve").status_code == 404
    assert post(operator, f"{path}/resolve", {"force": True}).status_code == 400
    # The next violation opens a new alert.
    [new] = points_evaluate(device_id=device.pk, values=[99.0]).created
    assert new != alert.pk and operator.get(f"/alerts/{new}").json()["status"] == "open"


def test_resolve_straight_from_open(operator, alert):
    assert post(operator, f"/alerts/{alert.pk}/resolve").json()["status"] == "resolved"
    assert Alert.objects.get(pk=alert.pk).acknowledged_at is None


def test_trailing_slash_paths_are_served(operator, alert):
    assert operator.get("/alerts/rules/").status_code == 200
    assert post(operator, f"/alerts/{alert.pk}/acknowledge/").status_code == 200


# --- Silences ------------------------------------------------------------------------------------


def test_silence_create_list_expire(operator, device):
    ends_at = (timezone.now() + timedelta(hours=2)).isoformat()
    created = post(operator, "/alerts/silences", {"device_id": str(device.pk), "ends_at": ends_at, "comment": "fw"})
    assert created.status_code == 201, created.content
    silence = created.json()
    assert (silence["state"], silence["device_id"], silence["comment"]) == ("active", str(device.pk), "fw")
    assert silence["created_by"]
    active = operator.get("/alerts/silences", {"state": "active"}).json()["results"]
    assert [s["id"] for s in active] == [silence["id"]]
    expired = operator.delete(f"/alerts/silences/{silence['id']}")
    assert expired.status_code == 200 and expired.json()["state"] == "expired"
    assert operator.delete(f"/alerts/silences/{silence['id']}").json()["ends_at"] == expired.json()["ends_at"]
    assert operator.get("/alerts/silences", {"state": "active"}).json()["results"] == []
    assert operator.delete(f"/alerts/silences/{uuid.uuid4()}").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"ends_at": "+2h"}, 400, "non_field_errors"),
        ({"group_id": "g", "device_id": "D", "ends_at": "+2h"}, 400, "non_field_errors"),
        ({"group_id": "g", "ends_at": "-1h"}, 400, "ends_at"),
        ({"group_id": "g", "ends_at": "tomorrow"}, 400, "ends_at"),
        ({"group_id": "g", "ends_at": 12345}, 400, "ends_at"),
        ({"group_id": "g", "ends_at": "+2h", "why": "x"}, 400, "why"),
        ({"rule_id": str(uuid.uuid4()), "ends_at": "+2h"}, 422, "rule_id"),
        ({"device_id": str(uuid.uuid4()), "ends_at": "+2h"}, 422, "device_id"),
    ],
)
def test_bad_silences_are_refused_and_store_nothing(operator, device, body, status, field):
    offsets = {"+2h": timedelta(hours=2), "-1h": timedelta(hours=-1)}
    body = {
        name: (
            str(device.pk)
            if value == "D"
            else (timezone.now() + offsets[value]).isoformat()
            if isinstance(value, str) and value in offsets
            else value
        )
        for name, value in body.items()
    }
    response = post(operator, "/alerts/silences", body)
    assert response.status_code == status, response.content
    assert field in response.json()
    assert not Silence.objects.exists()
