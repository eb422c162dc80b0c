"""Silences (what the notifications part asks) and the admin, whose writes go through the services."""

from datetime import timedelta

import pytest
from django.utils import timezone

from alerts.models import Alert, AlertRule, NotificationChannel, Silence
from alerts.selectors import silence_active_for
from alerts.services import silence_create, silence_expire
from alerts.testing import points_evaluate, rule_create
from devices.testing import device_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def device():
    return device_create(serial_prefix="SILENCE", group_id="quiet").device


def test_silence_active_for_each_target_and_only_while_in_force(device):
    rule = rule_create(device_id=device.pk)
    other_rule = rule_create(group_id="quiet")
    other_device = device_create().device
    now = timezone.now()

    def muted(rule_id=rule.pk, device_id=device.pk, group_id="quiet", at=None):
        return silence_active_for(rule_id=rule_id, device_id=device_id, group_id=group_id, at=at)

    assert not muted()
    by_rule = silence_create(rule_id=rule.pk, ends_at=now + timedelta(hours=1))
    assert muted() and not muted(rule_id=other_rule.pk)
    silence_expire(silence_id=by_rule.pk)
    assert not muted()
    silence_create(device_id=device.pk, ends_at=now + timedelta(hours=1))
    assert muted(rule_id=other_rule.pk) and not muted(device_id=other_device.pk, group_id=None)
    Silence.objects.all().delete()
    silence_create(group_id="quiet", ends_at=now + timedelta(hours=1))
    assert muted() and not muted(group_id="loud") and not muted(group_id=None)
    Silence.objects.all().delete()
    pending = silence_create(group_id="quiet", starts_at=now + timedelta(hours=1), ends_at=now + timedelta(hours=2))
    assert not muted() and muted(at=now + timedelta(hours=1, minutes=30)) and not muted(at=now + timedelta(hours=3))
    expired = silence_expire(silence_id=pending.pk)  # a pending silence ends before it starts
    assert expired.starts_at <= expired.ends_at <= timezone.now()
    assert not muted(at=now + timedelta(hours=1, minutes=30))


def test_silenced_alerts_are_still_recorded_and_counted(device):
    rule = rule_create(device_id=device.pk)
    silence_create(device_id=device.pk, ends_at=timezone.now() + timedelta(hours=1))
    points_evaluate(device_id=device.pk, values=[60.0, 70.0])
    assert Alert.objects.get(rule=rule).occurrences == 2


# --- Admin ---------------------------------------------------------------------------------------


def test_admin_pages_load(admin_client, device):
    rule_create(device_id=device.pk)
    points_evaluate(device_id=device.pk, values=[99.0])
    silence_create(group_id="quiet", ends_at=timezone.now() + timedelta(hours=1))
    for model in ("alertrule", "alert", "silence", "notificationchannel"):
        assert admin_client.get(f"/admin/alerts/{model}/").status_code == 200, model
        assert admin_client.get(f"/admin/alerts/{model}/", {"q": "x"}).status_code == 200, model
    alert = Alert.objects.get()
    page = admin_client.get(f"/admin/alerts/alert/{alert.pk}/change/")
    assert page.status_code == 200
    assert (
        admin_client.get("/admin/alerts/alert/", {"status__exact": "open", "severity__exact": "warning"}).status_code
        == 200
    )


def test_admin_actions_acknowledge_and_resolve_through_the_services(admin_client, device):
    rule_create(device_id=device.pk)
    [alert_id] = points_evaluate(device_id=device.pk, values=[99.0]).created
    url = "/admin/alerts/alert/"
    response = admin_client.post(url, {"action": "acknowledge", "_selected_action": [str(alert_id)]}, follow=True)
    assert Alert.objects.get(pk=alert_id).status == "acknowledged"
    assert Alert.objects.get(pk=alert_id).acknowledged_by.is_superuser
    response = admin_client.post(url, {"action": "acknowledge", "_selected_action": [str(alert_id)]}, follow=True)
    assert "not acknowledged" in response.content.decode()  # the 409 of the API, as a message
    admin_client.post(url, {"action": "resolve", "_selected_action": [str(alert_id)]})
    assert Alert.objects.get(pk=alert_id).status == "resolved"


def test_admin_form_never_writes_an_alert_back(admin_client, device):
    """Saving the change form must not write the `occurrences` it read over the counts added since."""
    rule_create(device_id=device.pk)
    [alert_id] = points_evaluate(device_id=device.pk, values=[99.0]).created
    points_evaluate(device_id=device.pk, values=[98.0])
    admin_client.post(f"/admin/alerts/alert/{alert_id}/change/", {"occurrences": 1, "status": "resolved"})
    alert = Alert.objects.get(pk=alert_id)
    assert (alert.occurrences, alert.status) == (2, "open")


@pytest.mark.django_db(transaction=True)
def test_admin_rule_create_and_edit_go_through_the_service(admin_client, device, redis_namespace):
    channel = NotificationChannel.objects.create(name="ops", url="https://hooks.example.com/x")
    points_evaluate(device_id=device.pk, group_id="quiet", values=[99.0])  # caches "no rules"
    form = {
        "device": "",
        "group_id": "quiet",
        "metric": "temperature",
        "operator": "gt",
        "threshold": "50",
        "severity": "critical",
        "enabled": "on",
        "channels": [str(channel.pk)],
    }
    response = admin_client.post("/admin/alerts/alertrule/add/", form)
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    rule = AlertRule.objects.get()
    assert list(rule.channels.all()) == [channel] and rule.severity == "critical"
    # The scope was bumped: the next evaluation sees the rule at once.
    points_evaluate(device_id=device.pk, group_id="quiet", values=[99.0])
    assert Alert.objects.filter(rule=rule).count() == 1
    edit = {**form, "threshold": "200", "channels": []}
    del edit["group_id"], edit["device"]  # disabled fields: a rule's target never changes
    response = admin_client.post(f"/admin/alerts/alertrule/{rule.pk}/change/", edit)
    assert response.status_code == 302
    rule = AlertRule.objects.get()
    assert (rule.threshold, rule.version, list(rule.channels.all())) == (200.0, 2, [])
    points_evaluate(device_id=device.pk, group_id="quiet", values=[150.0])
    assert Alert.objects.get(rule=rule).occurrences == 1  # 150 is under the new threshold
    both = {**form, "device": str(device.pk)}
    assert b"exactly one" in admin_client.post("/admin/alerts/alertrule/add/", both).content
    admin_client.post(
        "/admin/alerts/alertrule/", {"action": "delete_selected", "_selected_action": [str(rule.pk)], "post": "yes"}
    )
    assert not AlertRule.objects.exists()


def test_admin_silence_add_and_expire(admin_client, device):
    ends_at = timezone.now() + timedelta(hours=1)
    response = admin_client.post(
        "/admin/alerts/silence/add/",
        {
            "group_id": "quiet",
            "starts_at_0": timezone.now().strftime("%Y-%m-%d"),
            "starts_at_1": timezone.now().strftime("%H:%M:%S"),
            "ends_at_0": ends_at.strftime("%Y-%m-%d"),
            "ends_at_1": ends_at.strftime("%H:%M:%S"),
            "comment": "maintenance window",
        },
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    silence = Silence.objects.get()
    assert silence.created_by is not None and silence.comment == "maintenance window"
    admin_client.post("/admin/alerts/silence/", {"action": "expire", "_selected_action": [str(silence.pk)]})
    assert Silence.objects.get().ends_at <= timezone.now()
