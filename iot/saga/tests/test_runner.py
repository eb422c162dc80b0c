"""The saga runner in-process, on real Postgres: outcomes, compensation order, retries, waits, cancel, duplicates.

Steps come from `iot.saga.tests.sagas` (`test.abc`: steps a, b, c); each completed execution counts an effect
in its own transaction, so "exactly once" is "every count is 1". Tasks are captured, not sent (conftest).
"""

import threading
import time
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.test import RequestFactory

from iot.metrics import metrics_view
from iot.redis import get_redis, redis_key
from iot.saga import (
    SagaDefinition,
    SagaKeyConflict,
    SagaRunNotFound,
    SagaStep,
    saga_cancel,
    saga_get,
    saga_register,
    saga_signal,
    saga_start,
)
from iot.saga.models import SagaRun
from iot.saga.runner import retry_delay_seconds, saga_advance_run, saga_runs_requeue
from iot.saga.testing import saga_drive
from iot.saga.tests.sagas import ABC, HOOKS, effects, executions
from iot.testing.processes import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("effects_table")]


def start(plan: dict | None = None, *, name: str = "test.abc", key: str | None = None) -> uuid.UUID:
    return saga_start(name=name, key=key or uuid.uuid4().hex, context={"plan": plan or {}})


def log_of(run) -> list[tuple[str, str, str]]:
    return [(step.name, step.phase, step.status) for step in run.steps]


def test_happy_path_runs_each_step_once_and_queues_the_next_on_commit(queued):
    with transaction.atomic():
        run_id = start(key="order-1")
        assert queued == []  # not before the caller's commit
    assert queued == [(run_id, None)]
    first = saga_get(run_id=run_id)
    assert first.status == "running" and first.current_step == "a" and log_of(first) == [("a", "forward", "pending")]

    assert saga_advance_run(run_id=run_id) == "advanced"
    assert queued[-1] == (run_id, None) and saga_get(run_id=run_id).current_step == "b"
    run = saga_drive(run_id=run_id)

    assert run.status == "succeeded" and run.error is None and run.current_step is None and run.finished_at
    assert log_of(run) == [("a", "forward", "done"), ("b", "forward", "done"), ("c", "forward", "done")]
    assert [step.attempts for step in run.steps] == [1, 1, 1]
    assert run.context == {"plan": {}, "a_done": True, "b_done": True, "c_done": True}
    assert effects(run_id) == {
        ("a", "forward"): 1,
        ("b", "forward"): 1,
        ("c", "forward"): 1,
        ("on_finish", "succeeded"): 1,
    }
    assert saga_advance_run(run_id=run_id) == "skipped"  # an ended run: a late duplicate does nothing
    scraped = metrics_view(RequestFactory().get("/metrics")).content.decode()
    assert 'iot_saga_runs_total{name="test.abc",outcome="succeeded"}' in scraped


def test_step_failed_compensates_completed_steps_in_reverse_order():
    run_id = start({"c": {"fail": "artifact rejected"}})
    run = saga_drive(run_id=run_id)

    assert run.status == "compensated" and run.error == "artifact rejected"
    assert log_of(run) == [
        ("a", "forward", "done"),
        ("b", "forward", "done"),
        ("c", "forward", "failed"),
        ("b", "compensate", "done"),
        ("a", "compensate", "done"),
    ]
    assert run.steps[2].error == "artifact rejected" and run.steps[2].attempts == 1  # permanent: not retried
    # c's own effect was rolled back with it; a and b were undone once each.
    assert effects(run_id) == {
        ("a", "forward"): 1,
        ("b", "forward"): 1,
        ("b", "compensate"): 1,
        ("a", "compensate"): 1,
        ("on_finish", "compensated"): 1,
    }


def test_steps_without_a_compensation_are_skipped_when_compensating():
    run = saga_drive(run_id=start({"c": {"fail": "no"}}, name="test.no_undo_b"))
    assert run.status == "compensated"
    assert [(s.name, s.phase) for s in run.steps][3:] == [("a", "compensate")]


def test_a_transient_error_is_retried_with_backoff_and_its_effects_rolled_back(settings, queued):
    settings.SAGA_RETRY_BASE_SECONDS = settings.SAGA_RETRY_MAX_SECONDS = 30.0
    run_id = start({"b": {"transient": 2}})
    assert saga_advance_run(run_id=run_id) == "advanced"
    assert saga_advance_run(run_id=run_id) == "retrying"
    _, countdown = queued[-1]
    assert 15.0 <= countdown <= 30.0  # queued for after the backoff (equal jitter: half fixed, half random)
    assert saga_advance_run(run_id=run_id) == "not_due"  # a duplicate task before then does nothing
    pending = saga_get(run_id=run_id).steps[1]
    assert (pending.status, pending.attempts, pending.error) == ("pending", 1, "b flaked")

    settings.SAGA_RETRY_BASE_SECONDS, settings.SAGA_RETRY_MAX_SECONDS = 0.002, 0.01
    # Due now (the backoff is what was checked above).
    SagaRun.objects.filter(pk=run_id).update(next_run_at=SagaRun.objects.get(pk=run_id).created_at)
    run = saga_drive(run_id=run_id)
    assert run.status == "succeeded"
    assert (run.steps[1].status, run.steps[1].attempts, run.steps[1].error) == ("done", 3, None)
    assert effects(run_id)[("b", "forward")] == 1  # two failed executions wrote it and were rolled back
    scraped = metrics_view(RequestFactory().get("/metrics")).content.decode()
    assert 'iot_saga_step_retries_total{name="test.abc",phase="forward"}' in scraped


def test_exhausting_max_attempts_fails_the_step_and_compensates():
    run = saga_drive(run_id=start({"b": {"transient": 5}}))  # max_attempts is 3
    assert run.status == "compensated" and run.error == "b flaked"
    assert log_of(run) == [("a", "forward", "done"), ("b", "forward", "failed"), ("a", "compensate", "done")]
    assert run.steps[1].attempts == 3
    assert effects(run.id) == {("a", "forward"): 1, ("a", "compensate"): 1, ("on_finish", "compensated"): 1}


def test_a_wrong_step_result_is_a_step_failure():
    run = saga_drive(run_id=start({"a": {"return": 42}}))
    assert run.status == "compensated" and "not int" in run.error and run.steps[0].attempts == 3


def test_a_failing_compensation_is_retried_never_skipped():
    run = saga_drive(run_id=start({"c": {"fail": "no"}, "b": {"compensate_transient": 2}}))
    assert run.status == "compensated"
    assert log_of(run)[3:] == [("b", "compensate", "done"), ("a", "compensate", "done")]
    assert run.steps[3].attempts == 3  # StepFailed, then RuntimeError: both retried
    assert effects(run.id)[("b", "compensate")] == 1 and effects(run.id)[("a", "compensate")] == 1


def test_step_wait_is_rerun_when_signalled(queued):
    flag = redis_key("saga-test", "flag", uuid.uuid4().hex)
    run_id = start({"b": {"wait_for": flag}})
    run = saga_drive(run_id=run_id)
    assert run.status == "running" and run.current_step == "b"
    assert (run.steps[1].status, run.steps[1].attempts) == ("waiting", 1)
    assert "b_deadline" in run.context and ("b", "forward") not in effects(run_id)
    assert saga_advance_run(run_id=run_id) == "not_due"  # a stray task does not run it before its time
    assert saga_runs_requeue() == []  # nor does the sweeper: its deadline is a minute away

    get_redis().set(flag, 1)
    queued.clear()
    assert saga_signal(run_id=run_id) is True
    assert queued == [(run_id, None)]
    run = saga_drive(run_id=run_id)
    assert run.status == "succeeded" and run.steps[1].attempts == 2 and "b_timed_out" not in run.context
    assert saga_signal(run_id=run_id) is False  # not waiting (ended): harmless
    assert saga_signal(run_id=uuid.uuid4()) is False


def test_step_wait_deadline_passing_is_picked_up_by_the_sweeper(queued):
    flag = redis_key("saga-test", "flag", uuid.uuid4().hex)
    run_id = start({"b": {"wait_for": flag, "wait_seconds": 0.3}})
    assert saga_drive(run_id=run_id).steps[1].status == "waiting"
    queued.clear()
    wait_until(lambda: saga_runs_requeue(), timeout=10, interval=0.05, message="the deadline to pass")
    assert queued == [(run_id, None)]
    assert saga_runs_requeue() == []  # claimed: a lease until its task runs
    run = saga_drive(run_id=run_id)
    assert run.status == "succeeded" and run.context["b_timed_out"] is True and run.steps[1].attempts == 2


def test_the_sweeper_requeues_a_run_whose_task_was_lost(settings, queued):
    settings.SAGA_LEASE_SECONDS = 0.3
    run_id = start()
    queued.clear()  # the task is lost (say the broker dropped it)
    assert saga_runs_requeue() == []  # its lease still holds
    assert wait_until(lambda: saga_runs_requeue(), timeout=10, interval=0.05, message="the lease") == [run_id]
    assert queued == [(run_id, None)]
    assert saga_drive(run_id=run_id).status == "succeeded"


def _in_thread(target, *args):
    """Run `target` in a thread with its own database connection; returns (thread, result list)."""
    result = []

    def run():
        try:
            result.append(target(*args))
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _blocking_hook(run_id: uuid.UUID, step: str) -> tuple[threading.Event, threading.Event]:
    """Makes `step` of the run stop (holding the run's lock) until released; returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()

    def hook(name: str) -> None:
        if name == step and not entered.is_set():
            entered.set()
            assert release.wait(30)

    HOOKS[str(run_id)] = hook
    return entered, release


def test_duplicate_advance_tasks_run_a_step_once():
    run_id = start()
    entered, release = _blocking_hook(run_id, "a")
    try:
        first, first_result = _in_thread(lambda: saga_advance_run(run_id=run_id))
        assert entered.wait(10)
        # The duplicate, on its own connection while the first holds the row: returns at once, and looks again
        # shortly (it cannot tell a step in progress from another transaction that will not queue anything).
        second, second_result = _in_thread(lambda: saga_advance_run(run_id=run_id))
        second.join(10)
        assert second_result == ["locked"]
        assert saga_runs_requeue() == []  # the sweeper does not take an executing step for a lost one
        release.set()
        first.join(10)
        assert first_result == ["advanced"]
    finally:
        release.set()
        HOOKS.pop(str(run_id), None)
    # Many duplicates at once, for every step left: still once each.
    while SagaRun.objects.get(pk=run_id).status == "running":
        threads = [_in_thread(lambda: saga_advance_run(run_id=run_id))[0] for _ in range(4)]
        for thread in threads:
            thread.join(10)
    assert effects(run_id) == {
        ("a", "forward"): 1,
        ("b", "forward"): 1,
        ("c", "forward"): 1,
        ("on_finish", "succeeded"): 1,
    }
    assert [step.attempts for step in saga_get(run_id=run_id).steps] == [1, 1, 1]
    assert [executions(run_id, step) for step in "abc"] == [1, 1, 1]  # a skipped duplicate never enters the step


def test_cancel_while_waiting_compensates_the_completed_steps():
    run_id = start({"b": {"wait_for": redis_key("saga-test", "never", uuid.uuid4().hex)}})
    saga_drive(run_id=run_id)
    assert saga_cancel(run_id=run_id, reason="cancelled by operator") is True
    assert saga_get(run_id=run_id).status == "compensating"
    assert saga_cancel(run_id=run_id, reason="again") is False  # already being compensated
    run = saga_drive(run_id=run_id)
    assert run.status == "cancelled" and run.error == "cancelled by operator"
    assert log_of(run) == [("a", "forward", "done"), ("b", "forward", "failed"), ("a", "compensate", "done")]
    assert run.steps[1].error == "cancelled: cancelled by operator"
    assert effects(run_id) == {("a", "forward"): 1, ("a", "compensate"): 1, ("on_finish", "cancelled"): 1}


def test_cancel_waits_for_the_step_in_progress_and_compensates_it():
    run_id = start()
    saga_advance_run(run_id=run_id)  # a done
    entered, release = _blocking_hook(run_id, "b")
    try:
        stepping, _ = _in_thread(lambda: saga_advance_run(run_id=run_id))
        assert entered.wait(10)
        cancelling, cancelled = _in_thread(lambda: saga_cancel(run_id=run_id, reason="stop"))
        cancelling.join(0.3)
        assert cancelling.is_alive()  # blocked on the run's row lock, behind the step
        release.set()
        stepping.join(10)
        cancelling.join(10)
    finally:
        release.set()
        HOOKS.pop(str(run_id), None)
    assert cancelled == [True]
    run = saga_drive(run_id=run_id)
    assert run.status == "cancelled"
    # b committed before the cancel, so it is undone; c never ran.
    assert log_of(run) == [
        ("a", "forward", "done"),
        ("b", "forward", "done"),
        ("c", "forward", "failed"),
        ("b", "compensate", "done"),
        ("a", "compensate", "done"),
    ]
    assert ("c", "forward") not in effects(run_id)


def test_cancel_before_any_step_ends_the_run_at_once():
    run_id = start()
    assert saga_cancel(run_id=run_id, reason="changed my mind") is True
    run = saga_get(run_id=run_id)
    assert run.status == "cancelled" and run.finished_at and log_of(run) == [("a", "forward", "failed")]
    assert effects(run_id) == {("on_finish", "cancelled"): 1}  # in the cancel's own transaction


def test_cancel_of_an_ended_run_returns_false_and_of_an_unknown_one_raises():
    run_id = start()
    assert saga_drive(run_id=run_id).status == "succeeded"
    assert saga_cancel(run_id=run_id, reason="too late") is False
    assert saga_get(run_id=run_id).status == "succeeded"
    with pytest.raises(SagaRunNotFound):
        saga_cancel(run_id=uuid.uuid4(), reason="x")
    with pytest.raises(SagaRunNotFound) as raised:
        saga_get(run_id=uuid.uuid4())
    assert raised.value.status_code == 404


def test_a_key_is_unique_among_active_runs_of_a_definition():
    first = start(key="device-7")
    with pytest.raises(SagaKeyConflict) as raised:
        start(key="device-7")
    assert raised.value.status_code == 409 and raised.value.code == "saga_key_conflict"
    assert SagaRun.objects.filter(key="device-7").count() == 1  # the refused start stored nothing
    start(key="device-7", name="test.no_undo_b")  # another definition: its own keys
    saga_drive(run_id=first)
    start(key="device-7")  # the first ended: the key is free again


def test_concurrent_starts_with_one_key_insert_one_run():
    key = uuid.uuid4().hex
    barrier = threading.Barrier(6)

    def attempt():
        barrier.wait(10)
        try:
            return start(key=key)
        except SagaKeyConflict:
            return "conflict"

    threads = [_in_thread(attempt) for _ in range(6)]
    outcomes = []
    for thread, result in threads:
        thread.join(20)
        outcomes += result
    assert sorted(map(str, outcomes)).count("conflict") == 5 and len(outcomes) == 6
    assert SagaRun.objects.filter(key=key).count() == 1


def test_registration_and_start_refuse_programming_errors():
    with pytest.raises(ImproperlyConfigured):
        saga_register(definition=SagaDefinition(name="test.abc", steps=ABC.steps))
    saga_register(definition=ABC)  # the same object again: a no-op
    with pytest.raises(ValueError):
        SagaDefinition(name="x", steps=[])
    with pytest.raises(ValueError):
        SagaStep(name="x", action=lambda run: None, max_attempts=0)
    with pytest.raises(LookupError):
        saga_start(name="no.such.saga", key="k")
    with pytest.raises(TypeError):
        saga_start(name="test.abc", key="k", context={"when": time})  # not JSON
    assert not SagaRun.objects.filter(key="k").exists()


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap(settings):
    settings.SAGA_RETRY_BASE_SECONDS, settings.SAGA_RETRY_MAX_SECONDS = 0.5, 60.0
    for attempts, (low, high) in {1: (0.25, 0.5), 2: (0.5, 1.0), 4: (2.0, 4.0), 10: (30.0, 60.0)}.items():
        delays = [retry_delay_seconds(attempts=attempts) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high and len(set(delays)) > 1, attempts
    assert 30.0 <= retry_delay_seconds(attempts=100_000) <= 60.0  # a compensation retried for ever stays capped


def test_a_signal_while_the_step_runs_for_the_first_time_wakes_it_when_it_waits(queued):
    """The lost wake-up: the step is running for the first time (its committed row says not waiting) when the
    signal comes (a device's report), then returns StepWait. The signal must wait for the step's lock and see
    the run waiting, or the wake-up is lost until the step's deadline."""
    flag = redis_key("saga-test", "flag", uuid.uuid4().hex)
    run_id = start({"b": {"wait_for": flag}})
    assert saga_advance_run(run_id=run_id) == "advanced"  # a
    entered, release = _blocking_hook(run_id, "b")
    try:
        stepping, stepped = _in_thread(lambda: saga_advance_run(run_id=run_id))
        assert entered.wait(10)
        signalling, signalled = _in_thread(lambda: saga_signal(run_id=run_id))
        release.set()  # the step goes on and returns StepWait (its flag is not set)
        stepping.join(10)
        signalling.join(10)
    finally:
        release.set()
    assert stepped == ["waiting"] and signalled == [True]
    run = saga_drive(run_id=run_id)  # due at once, not a minute later at its deadline: b runs again now
    assert run.current_step == "b" and run.steps[1].attempts == 2
