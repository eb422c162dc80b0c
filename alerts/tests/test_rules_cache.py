"""The rules cache: a rule change is seen by the very next evaluation, and no stale fill ever lands."""

import pytest
import redis
from django.conf import settings

from alerts.cache import rules_cache_get_many, rules_cache_key
from alerts.models import Alert, AlertRule, AlertRuleScope
from alerts.selectors import _scopes_read, alert_rules_for
from alerts.services import alert_rule_delete, alert_rule_update
from alerts.testing import points_evaluate, points_ingest, rule_create
from devices.testing import device_create
from iot import cache as iot_cache
from iot.cache import versioned_cache_fill

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def device():
    return device_create(serial_prefix="RULES", group_id="cache-group").device


def alerts_of(device) -> int:
    return Alert.objects.filter(device=device).count()


@pytest.mark.parametrize("path", ["hook", "ingest"])
@pytest.mark.parametrize("scope", ["device", "group"])
def test_every_rule_change_applies_to_the_next_evaluation(device, scope, path, redis_namespace):
    """`hook`: the evaluation alone, rules from the shared Redis cache; `ingest`: through telemetry's
    ingestion, the rule versions from the insert statement and this process's copy of the rules."""

    def evaluate(value, metric="temperature"):
        if path == "hook":
            points_evaluate(device_id=device.pk, group_id="cache-group", metric=metric, values=[value])
        else:
            points_ingest(device_id=device.pk, metric=metric, values=[value])
        return alerts_of(device)

    assert evaluate(100.0) == 0  # caches "no rules" for both scopes
    target = {"device_id": device.pk} if scope == "device" else {"group_id": "cache-group"}
    rule = rule_create(**target, threshold=50.0)
    assert evaluate(60.0) == 1  # created: seen at once
    Alert.objects.all().delete()
    alert_rule_update(rule_id=rule.pk, changes={"threshold": 70.0})
    assert evaluate(60.0) == 0  # raised threshold: seen at once
    alert_rule_update(rule_id=rule.pk, changes={"operator": "lt"})
    assert evaluate(60.0) == 1
    Alert.objects.all().delete()
    alert_rule_update(rule_id=rule.pk, changes={"enabled": False})
    assert evaluate(0.0) == 0
    alert_rule_update(rule_id=rule.pk, changes={"enabled": True, "metric": "humidity"})
    assert evaluate(0.0) == 0
    assert evaluate(0.0, metric="humidity") == 1
    alert_rule_delete(rule_id=rule.pk)
    assert evaluate(0.0, metric="humidity") == 0  # the rule's alerts went with it, and it raised no new one


def test_a_fill_from_a_read_before_a_rule_write_is_refused(device):
    """The reader missed and read "no rules"; a rule is created (committed) before its fill: the fill must
    not land, or ingestion would go on ignoring the new rule until the entry expired."""
    key = rules_cache_key(f"device:{device.pk}")
    [lookup] = rules_cache_get_many(keys=[key])
    [(version, payload)] = _scopes_read(device_id=device.pk, group_id=None)
    assert (version, payload) == (0, b"{}")
    rule = rule_create(device_id=device.pk)
    stored = versioned_cache_fill(
        key=key, version=version, payload=payload, lookup=lookup, ttl_seconds=settings.DEVICE_CACHE_TTL_SECONDS
    )
    assert not stored
    rules = alert_rules_for(device_id=device.pk, group_id=None)
    assert rules == {"temperature": [[str(rule.pk), "gt", 50.0, "warning", False]]}
    assert AlertRuleScope.objects.get(scope=f"device:{device.pk}").version > version


def test_cached_rules_cost_one_round_trip_for_both_scopes(device, monkeypatch):
    own = rule_create(device_id=device.pk, metric="temperature", threshold=1.0)
    group = rule_create(group_id="cache-group", metric="temperature", threshold=2.0, severity="critical")
    alert_rules_for(device_id=device.pk, group_id="cache-group")  # fills both
    calls = []
    original = redis.Redis.execute_command

    def counting(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "execute_command", counting)
    rules = alert_rules_for(device_id=device.pk, group_id="cache-group")
    assert calls == ["EVALSHA"]
    assert sorted(rules["temperature"]) == sorted(
        [[str(own.pk), "gt", 1.0, "warning", False], [str(group.pk), "gt", 2.0, "critical", False]]
    )


def test_a_rule_write_fails_whole_when_redis_cannot_be_told(device, monkeypatch):
    def unreachable(**kwargs):
        raise redis.ConnectionError("down")

    monkeypatch.setattr(iot_cache, "versioned_cache_invalidate", unreachable)
    with pytest.raises(redis.ConnectionError):
        rule_create(device_id=device.pk)
    assert not AlertRule.objects.exists() and not AlertRuleScope.objects.exists()


def test_ingestion_of_a_device_without_rules_makes_no_rules_call(device, redis_namespace, monkeypatch):
    """The insert statement says both scopes are at version 0: no Redis call, no query for rules."""
    rule_create(group_id="another-group", threshold=0.0)  # rules elsewhere change nothing

    def no_call(**kwargs):
        raise AssertionError("rules read from Redis for a device with no rules")

    monkeypatch.setattr("alerts.selectors.rules_cache_get_many", no_call)
    monkeypatch.setattr("alerts.selectors._scopes_read", no_call)
    points_ingest(device_id=device.pk, values=[100.0])
    assert alerts_of(device) == 0


def test_rules_this_process_holds_cost_no_call_until_they_change(device, redis_namespace, monkeypatch):
    rule = rule_create(group_id="cache-group", threshold=50.0)
    points_ingest(device_id=device.pk, values=[60.0])  # fetched once, then held at its version
    assert alerts_of(device) == 1
    calls = []
    real_get_many = rules_cache_get_many
    monkeypatch.setattr("alerts.selectors.rules_cache_get_many", lambda **kw: calls.append(kw) or real_get_many(**kw))
    points_ingest(device_id=device.pk, values=[61.0, 62.0])
    assert calls == []
    assert Alert.objects.get(device=device).occurrences == 3
    alert_rule_update(rule_id=rule.pk, changes={"threshold": 100.0})  # a new version: fetched again
    points_ingest(device_id=device.pk, values=[70.0])
    assert len(calls) == 1
    assert Alert.objects.get(device=device).occurrences == 3


def test_a_device_that_moves_group_is_evaluated_against_its_new_group_at_once(device, redis_namespace):
    from devices.services import device_update

    rule_create(group_id="cache-group", threshold=50.0)
    rule_create(group_id="cold-group", operator="lt", threshold=-10.0)
    points_ingest(device_id=device.pk, values=[60.0])
    assert alerts_of(device) == 1
    device_update(device_id=device.pk, changes={"group_id": "cold-group"})
    points_ingest(device_id=device.pk, values=[60.0, -20.0])  # the old group's rule no longer applies
    assert sorted(Alert.objects.filter(device=device).values_list("occurrences", flat=True)) == [1, 1]


def test_scope_versions_never_repeat_even_after_the_table_is_emptied(device):
    rule = rule_create(device_id=device.pk)
    first = AlertRuleScope.objects.get(scope=f"device:{device.pk}").version
    alert_rule_update(rule_id=rule.pk, changes={"threshold": 60.0})
    second = AlertRuleScope.objects.get(scope=f"device:{device.pk}").version
    assert second > first
    AlertRuleScope.objects.all().delete()  # a restore from an older backup, a test's flush
    alert_rule_update(rule_id=rule.pk, changes={"threshold": 70.0})
    assert AlertRuleScope.objects.get(scope=f"device:{device.pk}").version > second
