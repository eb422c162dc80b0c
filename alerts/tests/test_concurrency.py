"""Deduplication under real concurrency: threads with their own connections and transactions.

ThingsBoard's duplicate alarms (its issues #5652, #15583) came from a read-then-create
under concurrent ingestion; here the partial unique index and `INSERT ... ON CONFLICT`
settle it inside Postgres. Each thread opens its transaction, waits at a barrier, then
evaluates, so the upserts really do meet at the index.
"""

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction

from alerts.models import Alert
from alerts.services import alert_resolve, alerts_evaluate
from alerts.testing import BASE_TIME, points_evaluate, rule_create
from devices.testing import device_create

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 8
POINTS = 25


def evaluate_at_once(*, device_id, group_id=None, threads=THREADS, points=POINTS, values=None):
    """`threads` concurrent ingest-like transactions of `points` violating points each; the results."""
    barrier = threading.Barrier(threads, timeout=30)
    results, errors = [None] * threads, []

    def work(index):
        try:
            with transaction.atomic():
                connection.cursor().execute("SELECT 1")  # the transaction has begun for real
                barrier.wait()
                results[index] = alerts_evaluate(
                    device_id=device_id,
                    group_id=group_id,
                    metrics=["temperature"] * points,
                    values=values or [100.0 + index] * points,
                    timestamps=[BASE_TIME + timedelta(seconds=index * points + i) for i in range(points)],
                )
        except Exception as exc:  # reported below, with the thread's index
            errors.append((index, exc))
        finally:
            connection.close()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("scope", ["device", "group"])
def test_concurrent_violations_make_one_alert_and_lose_no_count(scope):
    device = device_create(serial_prefix="RACE", group_id="racers").device
    rule = rule_create(device_id=device.pk) if scope == "device" else rule_create(group_id="racers")
    points_evaluate(device_id=device.pk, group_id="racers", values=[0.0])  # cache the rules: the race is the upsert
    for round_ in range(1, 4):
        results = evaluate_at_once(device_id=device.pk, group_id="racers")
        [alert] = Alert.objects.filter(rule=rule, device=device)
        assert alert.status == "open"
        assert alert.occurrences == round_ * THREADS * POINTS
        created = [r for r in results if r.created]
        # Exactly one transaction opened it (in the first round); every other one counted into it.
        assert len(created) == (1 if round_ == 1 else 0)
        assert all(r.created + r.updated == (alert.pk,) for r in results)
    assert alert.last_triggered_at == BASE_TIME + timedelta(seconds=THREADS * POINTS - 1)


def test_after_resolve_concurrent_violations_open_exactly_one_new_alert():
    device = device_create(serial_prefix="RACE").device
    rule = rule_create(device_id=device.pk)
    [first] = points_evaluate(device_id=device.pk, values=[99.0]).created
    alert_resolve(alert_id=first, by=None)
    results = evaluate_at_once(device_id=device.pk)
    active = Alert.objects.filter(rule=rule, device=device, status="open")
    [second] = active
    assert second.pk != first and second.occurrences == THREADS * POINTS
    assert [r.created for r in results if r.created] == [(second.pk,)]
    assert Alert.objects.get(pk=first).occurrences == 1


def test_many_devices_and_rules_at_once_neither_duplicate_nor_deadlock():
    """Threads evaluating several rules on one device take the index entries in rule order: no deadlock."""
    device = device_create(serial_prefix="RACE", group_id="many").device
    rules = [rule_create(group_id="many", threshold=float(t)) for t in range(5)]
    rules += [rule_create(device_id=device.pk, threshold=float(t)) for t in range(5)]
    points_evaluate(device_id=device.pk, group_id="many", values=[-1.0])
    evaluate_at_once(device_id=device.pk, group_id="many", points=10)
    alerts = list(Alert.objects.filter(device=device))
    assert sorted(a.rule_id for a in alerts) == sorted(r.pk for r in rules)
    assert {a.occurrences for a in alerts} == {THREADS * 10}
