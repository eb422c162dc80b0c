"""The durable step runner: how a saga advances, and why no step's effect is lost or happens twice.

State lives in Postgres only: a `SagaRun` row (where the run is, when its step is due) and one
`SagaStepLog` row per step and per compensation. Celery carries no state, only "look at run X".

**One step = one transaction.** `saga_advance_run` locks the run row (`SELECT ... FOR UPDATE SKIP
LOCKED`), runs the current step's function in a savepoint, and in the same transaction writes the
step's log row and moves the run on (the next step's log row inserted, `next_run_at` now); the task
for the next step is queued with `transaction.on_commit`. So the step's database effects, its log
row and the run's progress commit together or not at all: a worker killed (or a database error)
anywhere before the commit leaves the run exactly as it was, and the step runs again from scratch;
after the commit the step is recorded done and is never run again. Hence "exactly once" for every
effect a step makes *in the database*.

**Why SKIP LOCKED.** While a step runs, its transaction holds the run row. A second task for the
same run (a duplicate delivery, the sweeper's re-queue, a signal) must neither run the step again
nor queue up behind it: it skips the locked row and returns (the holder queues whatever comes next).
The sweeper skips locked rows too, so it never takes a step that is making progress for a lost one,
and never blocks behind a long step. Cancel and signal do wait for the lock (plain `FOR UPDATE` /
`UPDATE`): they must see the step's outcome, so a step that committed before a cancel is compensated
and one that had not committed never takes effect.

**Nothing is lost.** Every queued or running step has a lease (`lease_expires_at`, now +
`SAGA_LEASE_SECONDS` when its task is queued). The sweeper (`saga_sweep`, every
`SAGA_SWEEP_INTERVAL_SECONDS`) claims active runs that are due (`next_run_at` passed) and whose lease
has expired (or that have none: a `StepWait` deadline) and queues them again: a task lost with its
worker, a broker that dropped a message, an `on_commit` that never ran because the process died right
after the commit. Duplicates this creates are harmless, as above. Times come from the database's clock
(`now()`), one clock for every process.

**Failures.** A step that raises `StepFailed` has its savepoint rolled back, its log row marked failed,
and the run turns to compensating. Any other exception is transient: rolled back, counted, retried after
an exponential backoff with jitter (`SAGA_RETRY_BASE_SECONDS` doubling up to `SAGA_RETRY_MAX_SECONDS`,
half of it random so one outage's retries spread out) until the step's `max_attempts`, then it fails as
`StepFailed(str(exc))`. Compensation runs the `compensate` of every completed step in reverse order,
each one a step of its own (own log row, own transaction); one that raises is retried with the same
capped backoff for ever and never skipped: a compensation that cannot run is an operator's problem
(visible in the admin and `iot_saga_step_retries_total`), a skipped one is silent corruption.
A step that returned `StepWait` is not completed: its compensation does not run if the saga fails while
it waits, so an effect that needs undoing belongs in an earlier step of its own.

**What is NOT guaranteed.** An effect outside the database made inside a step (an HTTP call, a message
to a device, a Redis write) can happen twice: the worker may die, or the transaction fail, after it.
Steps should only write rows and let the outside world pull them, or receive them from a task queued
on commit (an outbox), whose consumer de-duplicates by id. A step that hangs holds its run (and a
database connection) until it returns or its worker dies: keep steps short.
"""

import json
import logging
import random
import uuid
from datetime import timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now

from iot.saga.definitions import SagaDefinition, StepFailed, StepWait, saga_definition_get
from iot.saga.metrics import saga_run_outcome_count, saga_step_retry_count
from iot.saga.models import ACTIVE_STATUSES, SagaRun, SagaStatus, SagaStepLog, StepPhase, StepStatus
from iot.saga.selectors import saga_run_view

logger = logging.getLogger(__name__)

ERROR_MAX_LENGTH = 2000
# A runner that found its run locked by another transaction looks again this much later.
LOCKED_RETRY_SECONDS = 0.2
# Runs re-queued per sweep at most; the next sweep takes the rest.
SWEEP_BATCH = 1000

RUNS_TABLE = SagaRun._meta.db_table
ACTIVE_STATUSES_SQL = ", ".join(f"'{status.value}'" for status in ACTIVE_STATUSES)

# Due (its time has come) and unclaimed (no task in flight: lease over, or none for a StepWait deadline).
# The status list is spelled out so the planner matches the partial index `saga_run_due_idx`.
_REQUEUE_SQL = f"""
UPDATE {RUNS_TABLE} SET lease_expires_at = now() + make_interval(secs => %s)
WHERE id IN (
    SELECT id FROM {RUNS_TABLE}
    WHERE status IN ({ACTIVE_STATUSES_SQL}) AND next_run_at <= now()
      AND (lease_expires_at IS NULL OR lease_expires_at <= now())
    ORDER BY next_run_at
    LIMIT %s
    FOR UPDATE SKIP LOCKED)
RETURNING id
"""


def retry_delay_seconds(*, attempts: int) -> float:
    """Backoff after `attempts` failed executions: base * 2^(attempts-1), capped, with "equal jitter"."""
    delay = min(settings.SAGA_RETRY_MAX_SECONDS, settings.SAGA_RETRY_BASE_SECONDS * 2 ** min(attempts - 1, 32))
    return delay / 2 + random.uniform(0, delay / 2)


def run_lock(*, run_id: uuid.UUID, skip_locked: bool) -> SagaRun | None:
    """The run's row, locked `FOR UPDATE` until the transaction ends, with the database's clock as `db_now`."""
    return SagaRun.objects.select_for_update(skip_locked=skip_locked).annotate(db_now=Now()).filter(pk=run_id).first()


def run_queue(run_id: uuid.UUID, countdown: float | None = None) -> None:
    """Queue the runner for `run_id` (called after commit)."""
    from iot.saga.tasks import saga_advance  # the tasks module imports this one

    saga_advance.apply_async(args=[str(run_id)], countdown=countdown)


def run_queue_on_commit(run_id: uuid.UUID, countdown: float | None = None) -> None:
    # robust: a broker outage must not fail the caller's commit; the lease makes the sweeper queue it later.
    transaction.on_commit(partial(run_queue, run_id, countdown), robust=True)


def _error_text(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:ERROR_MAX_LENGTH]


def saga_advance_run(*, run_id: uuid.UUID) -> str:
    """Do what the run needs now, if anything: run its due step or compensation. Idempotent; returns what
    happened: skipped (ended or unknown), locked (held by another transaction: queued again shortly), not_due,
    advanced, waiting, retrying, failed, compensated_step, or the final status."""
    with transaction.atomic():
        run = run_lock(run_id=run_id, skip_locked=True)
        if run is None:
            # Ended or unknown, or held: by a step (which queues what comes next when it commits), or by a
            # caller's transaction (a cancel, a signal, a domain write), which may not. Look again shortly
            # while it is active and due, so this task is never the one that got lost.
            if SagaRun.objects.filter(pk=run_id, status__in=ACTIVE_STATUSES, next_run_at__lte=Now()).exists():
                run_queue_on_commit(run_id, countdown=LOCKED_RETRY_SECONDS)
                return "locked"
            return "skipped"
        if run.status not in ACTIVE_STATUSES:
            return "skipped"
        if run.next_run_at is None or run.next_run_at > run.db_now:
            return "not_due"
        definition = saga_definition_get(run.name)
        log = SagaStepLog.objects.get(run_id=run.pk, index=run.step_index, phase=run.phase)
        log.attempts += 1
        log.started_at = log.started_at or run.db_now
        if run.phase == StepPhase.FORWARD:
            return _forward(run, definition, log)
        return _compensate(run, definition, log)


def _forward(run: SagaRun, definition: SagaDefinition, log: SagaStepLog) -> str:
    step = definition.steps[run.step_index]
    try:
        with transaction.atomic():  # a savepoint: a failed step's effects go, its failure is still recorded
            result = step.action(saga_run_view(run))
            update = _context_update(result)
    except StepFailed as exc:
        return _forward_fail(run, definition, log, reason=_error_text(exc))
    except Exception as exc:
        run.attempts += 1
        if run.attempts >= step.max_attempts:
            return _forward_fail(run, definition, log, reason=_error_text(exc))
        return _retry_later(run, log, exc)
    run.context = {**run.context, **update}
    if isinstance(result, StepWait):
        log.status, log.error = StepStatus.WAITING, None
        log.save()
        run.waiting, run.next_run_at, run.lease_expires_at = True, result.until, None
        run.save()
        return "waiting"
    log.status, log.error, log.finished_at = StepStatus.DONE, None, run.db_now
    log.save()
    if run.step_index + 1 < len(definition.steps):
        _step_begin(run, definition, index=run.step_index + 1, phase=StepPhase.FORWARD)
        return "advanced"
    return _finish(run, definition, SagaStatus.SUCCEEDED)


def _context_update(result: Any) -> dict:
    """What a step's result adds to the context; checked inside the step's savepoint, so a bad result is the
    step's failure (retried, then failed), not the runner's."""
    update = result.context if isinstance(result, StepWait) else result
    if update is None:
        return {}
    if not isinstance(update, dict):
        raise TypeError(f"a step returns None, a dict or StepWait, not {type(result).__name__}")
    json.dumps(update)  # the context is JSON: refuse what could not be stored
    return update


def _forward_fail(run: SagaRun, definition: SagaDefinition, log: SagaStepLog, *, reason: str) -> str:
    log.status, log.error, log.finished_at = StepStatus.FAILED, reason, run.db_now
    log.save()
    run.status, run.error = SagaStatus.COMPENSATING, reason
    logger.warning("saga %s run %s: step %s failed, compensating: %s", run.name, run.pk, log.name, reason)
    return _compensation_next(run, definition, below=run.step_index) or "failed"


def _compensate(run: SagaRun, definition: SagaDefinition, log: SagaStepLog) -> str:
    step = definition.steps[run.step_index]
    try:
        with transaction.atomic():
            step.compensate(saga_run_view(run))
    except Exception as exc:  # StepFailed included: a compensation is retried, never skipped
        run.attempts += 1
        logger.warning("saga %s run %s: compensation %s failed (attempt %d)", run.name, run.pk, log.name, log.attempts)
        return _retry_later(run, log, exc)
    log.status, log.error, log.finished_at = StepStatus.DONE, None, run.db_now
    log.save()
    return _compensation_next(run, definition, below=run.step_index) or "compensated_step"


def _retry_later(run: SagaRun, log: SagaStepLog, exc: Exception) -> str:
    """The current step failed transiently: due again after a backoff, its task queued for then."""
    delay = retry_delay_seconds(attempts=run.attempts)
    log.status, log.error = StepStatus.PENDING, _error_text(exc)
    log.save()
    run.waiting = False
    run.next_run_at = run.db_now + timedelta(seconds=delay)
    run.lease_expires_at = run.next_run_at + timedelta(seconds=settings.SAGA_LEASE_SECONDS)
    run.save()
    run_queue_on_commit(run.pk, countdown=delay)
    transaction.on_commit(partial(saga_step_retry_count, name=run.name, phase=run.phase), robust=True)
    logger.info("saga %s run %s: %s %s retried in %.2f s: %r", run.name, run.pk, run.phase, log.name, delay, exc)
    return "retrying"


def _step_begin(run: SagaRun, definition: SagaDefinition, *, index: int, phase: str) -> None:
    """Make step `index` (forward or compensation) the run's current one, due now, its task queued on commit."""
    run.step_index, run.phase, run.attempts, run.waiting = index, phase, 0, False
    run.next_run_at = run.db_now
    run.lease_expires_at = run.db_now + timedelta(seconds=settings.SAGA_LEASE_SECONDS)
    run.save()
    SagaStepLog.objects.create(run_id=run.pk, index=index, name=definition.steps[index].name, phase=phase)
    run_queue_on_commit(run.pk)


def _compensation_next(run: SagaRun, definition: SagaDefinition, *, below: int) -> str | None:
    """Begin the compensation of the latest completed step before `below` that has one; with none left, end
    the run (compensated, or cancelled if it was). Returns the final status if the run ended."""
    for index in range(below - 1, -1, -1):
        if definition.steps[index].compensate is not None:
            _step_begin(run, definition, index=index, phase=StepPhase.COMPENSATE)
            return None
    return _finish(run, definition, SagaStatus.CANCELLED if run.cancelled_at else SagaStatus.COMPENSATED)


def _finish(run: SagaRun, definition: SagaDefinition, status: SagaStatus) -> str:
    run.status, run.finished_at, run.waiting = status, run.db_now, False
    run.next_run_at = run.lease_expires_at = None
    run.save()
    if definition.on_finish is not None:
        definition.on_finish(saga_run_view(run))
    transaction.on_commit(partial(saga_run_outcome_count, name=run.name, outcome=status.value), robust=True)
    logger.info("saga %s run %s ended: %s", run.name, run.pk, status.value)
    return status.value


def saga_run_cancel(*, run: SagaRun, reason: str) -> None:
    """Turn a locked running run to compensation, the interrupted step marked failed (its effects, if any
    were committed by a StepWait, are not undone: see the module docstring)."""
    definition = saga_definition_get(run.name)
    SagaStepLog.objects.filter(run_id=run.pk, index=run.step_index, phase=StepPhase.FORWARD).update(
        status=StepStatus.FAILED, error=f"cancelled: {reason}"[:ERROR_MAX_LENGTH], finished_at=run.db_now
    )
    run.status, run.error, run.cancelled_at = SagaStatus.COMPENSATING, reason[:ERROR_MAX_LENGTH], run.db_now
    _compensation_next(run, definition, below=run.step_index)


def saga_runs_requeue() -> list[uuid.UUID]:
    """The sweeper: claim due runs nobody is working on (a new lease each) and queue them; returns their ids."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_REQUEUE_SQL, [settings.SAGA_LEASE_SECONDS, SWEEP_BATCH])
            run_ids = [row[0] for row in cursor.fetchall()]
        for run_id in run_ids:
            run_queue_on_commit(run_id)
    return run_ids
