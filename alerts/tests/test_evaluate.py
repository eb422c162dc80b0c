"""Evaluation of stored points against rules: operators, batches, scopes, and what it costs."""

import random
import uuid
from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from alerts.models import Alert
from alerts.services import NOTHING, _alerts_upsert, alert_resolve, alert_rule_update, alerts_evaluate
from alerts.testing import BASE_TIME, points_evaluate, rule_create
from devices.services import device_delete, device_update
from devices.testing import device_create
from iot.redis import get_redis

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def device():
    return device_create(serial_prefix="ALERT").device


def open_alerts(device_id) -> list[Alert]:
    return list(Alert.objects.filter(device_id=device_id, status__in=["open", "acknowledged"]))


@pytest.mark.parametrize(
    ("operator", "violating", "passing"),
    [
        ("gt", [50.5, 1e9], [50.0, 49.0, -1e9]),
        ("gte", [50.0, 51.0], [49.999]),
        ("lt", [49.5, -1e9], [50.0, 51.0]),
        ("lte", [50.0, 10.0], [50.001]),
        ("eq", [50.0], [50.000001, 49.0]),
        ("ne", [50.000001, -50.0], [50.0]),
    ],
)
def test_each_operator_compares_value_to_threshold(device, operator, violating, passing):
    rule = rule_create(device_id=device.pk, operator=operator, threshold=50.0)
    assert points_evaluate(device_id=device.pk, values=passing).created == ()
    assert open_alerts(device.pk) == []
    result = points_evaluate(device_id=device.pk, values=passing + violating)
    [alert] = open_alerts(device.pk)
    assert result.created == (alert.pk,) and result.updated == ()
    assert (alert.rule_id, alert.occurrences) == (rule.pk, len(violating))
    assert (alert.operator, alert.threshold, alert.status) == (operator, 50.0, "open")


def test_a_batch_of_violations_is_one_upsert_counting_every_point(device, monkeypatch):
    rule_create(device_id=device.pk, operator="gt", threshold=10.0)
    assert points_evaluate(device_id=device.pk, values=[0.0]) == NOTHING  # the rules are cached from here on
    # 200 points, 150 violating, timestamps shuffled: first/last are by timestamp, not batch order.
    values = [float(v) for v in range(200)]
    timestamps = [BASE_TIME + timedelta(seconds=i) for i in range(200)]
    order = list(range(200))
    random.Random(7).shuffle(order)
    statements = []
    original = psycopg.Cursor.execute

    def counting(self, query, *args, **kwargs):
        statements.append(query)
        return original(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    with CaptureQueriesContext(connection) as django_queries:
        result = points_evaluate(
            device_id=device.pk, values=[values[i] for i in order], timestamps=[timestamps[i] for i in order]
        )
    assert len(statements) == 1 and "ON CONFLICT" in statements[0]
    assert [q["sql"] for q in django_queries.captured_queries if "alerts_" in q["sql"]] == []
    [alert] = open_alerts(device.pk)
    assert result.created == (alert.pk,)
    assert alert.occurrences == 189  # 11.0 .. 199.0
    assert (alert.first_value, alert.first_triggered_at) == (11.0, timestamps[11])
    assert (alert.last_value, alert.last_triggered_at) == (199.0, timestamps[199])


def test_further_violations_update_the_open_alert(device):
    rule_create(device_id=device.pk, threshold=50.0)
    first = points_evaluate(device_id=device.pk, values=[60.0, 70.0])
    later = [BASE_TIME + timedelta(hours=1), BASE_TIME + timedelta(hours=2)]
    again = points_evaluate(device_id=device.pk, values=[80.0, 75.0], timestamps=later)
    earlier = points_evaluate(device_id=device.pk, values=[55.0], timestamps=[BASE_TIME - timedelta(hours=1)])
    [alert] = open_alerts(device.pk)
    assert again.updated == earlier.updated == first.created == (alert.pk,)
    assert alert.occurrences == 5
    assert (alert.last_value, alert.last_triggered_at) == (75.0, later[1])  # the newest point, not the last sent
    assert (alert.first_value, alert.first_triggered_at) == (55.0, BASE_TIME - timedelta(hours=1))


def test_after_resolve_the_next_violation_opens_a_new_alert(device):
    rule_create(device_id=device.pk)
    [first] = points_evaluate(device_id=device.pk, values=[99.0]).created
    alert_resolve(alert_id=first, by=None)
    result = points_evaluate(device_id=device.pk, values=[98.0, 97.0])
    [second] = result.created
    assert second != first
    assert Alert.objects.get(pk=first).status == "resolved" and Alert.objects.get(pk=first).occurrences == 1
    assert Alert.objects.get(pk=second).occurrences == 2


def test_rules_of_the_device_and_of_its_group_apply_others_do_not(device):
    device_update(device_id=device.pk, changes={"group_id": "north"})
    own = rule_create(device_id=device.pk, metric="temperature", threshold=50.0)
    group = rule_create(group_id="north", metric="temperature", threshold=40.0, severity="critical")
    south = rule_create(group_id="south", metric="temperature", threshold=0.0)
    rule_create(device_id=device_create().device.pk, metric="temperature", threshold=0.0)
    rule_create(group_id="north", metric="humidity", threshold=0.0)
    result = points_evaluate(device_id=device.pk, group_id="north", values=[45.0, 55.0])
    alerts = {alert.rule_id: alert for alert in open_alerts(device.pk)}
    assert set(alerts) == {own.pk, group.pk} and len(result.created) == 2
    assert (alerts[own.pk].occurrences, alerts[group.pk].occurrences) == (1, 2)
    assert alerts[group.pk].severity == "critical"
    # The group is the one ingestion read with the points: moved to "south", "north" no longer applies.
    result = points_evaluate(device_id=device.pk, group_id="south", values=[45.0])
    alerts = {alert.rule_id: alert for alert in open_alerts(device.pk)}
    assert set(alerts) == {own.pk, group.pk, south.pk} and result.created == (alerts[south.pk].pk,)
    assert alerts[group.pk].occurrences == 2


def test_points_of_other_metrics_and_disabled_rules_raise_nothing(device):
    rule = rule_create(device_id=device.pk, metric="temperature", threshold=0.0)
    assert points_evaluate(device_id=device.pk, metric="humidity", values=[100.0]) == NOTHING
    alert_rule_update(rule_id=rule.pk, changes={"enabled": False})
    assert points_evaluate(device_id=device.pk, values=[100.0]) == NOTHING
    assert open_alerts(device.pk) == []


def test_mixed_metrics_in_one_batch(device):
    temperature = rule_create(device_id=device.pk, metric="temperature", operator="gt", threshold=30.0)
    pressure = rule_create(device_id=device.pk, metric="pressure", operator="lt", threshold=900.0)
    with transaction.atomic():
        result = alerts_evaluate(
            device_id=device.pk,
            group_id=None,
            metrics=["temperature", "pressure", "temperature", "humidity", "pressure"],
            values=[31.0, 950.0, 35.0, 99.0, 850.0],
            timestamps=[BASE_TIME + timedelta(seconds=i) for i in range(5)],
        )
    alerts = {alert.rule_id: alert for alert in open_alerts(device.pk)}
    assert len(result.created) == 2
    assert (alerts[temperature.pk].occurrences, alerts[temperature.pk].last_value) == (2, 35.0)
    assert (alerts[pressure.pk].occurrences, alerts[pressure.pk].first_value) == (1, 850.0)


def test_no_rule_costs_one_redis_round_trip_and_no_sql(device, monkeypatch):
    points_evaluate(device_id=device.pk, group_id="nobody", values=[1.0])  # fills both scopes (empty)
    client = get_redis()
    calls = []
    original = type(client).execute_command

    def counting(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(client), "execute_command", counting)
    with CaptureQueriesContext(connection) as queries:
        result = alerts_evaluate(
            device_id=device.pk,
            group_id="nobody",
            metrics=["temperature"] * 100,
            values=[99.0] * 100,
            timestamps=[BASE_TIME] * 100,
        )
    assert result == NOTHING
    assert calls == ["EVALSHA"]
    assert queries.captured_queries == []


def test_a_deleted_device_takes_its_rules_and_alerts_with_it(device):
    """Devices are deleted by one raw DELETE: only the database's cascade can follow it."""
    rule = rule_create(device_id=device.pk)
    points_evaluate(device_id=device.pk, values=[99.0])
    device_delete(device_id=device.pk)
    assert not Alert.objects.filter(device_id=device.pk).exists()
    assert not type(rule).objects.filter(pk=rule.pk).exists()


@pytest.mark.parametrize("gone", ["device", "rule"])
def test_a_device_or_rule_deleted_meanwhile_is_skipped_not_a_failure(device, gone):
    """Evaluated from rules read before the delete committed: the upsert inserts nothing for it and does
    not fail the ingest (a foreign key violation at commit would)."""
    rule = rule_create(device_id=device.pk)
    device_id = uuid.uuid4() if gone == "device" else device.pk
    rule_id = uuid.uuid4() if gone == "rule" else rule.pk
    with transaction.atomic():
        result = _alerts_upsert(
            device_id=device_id,
            violated={str(rule_id): [[str(rule_id), "gt", 50.0, "warning"], 1, 0, 0, "temperature"]},
            values=[99.0],
            timestamps=[BASE_TIME],
        )
    assert result == NOTHING and not Alert.objects.exists()
