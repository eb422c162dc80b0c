"""Writes of the saga primitive: start a run, wake a waiting step, cancel. The runner is `iot.saga.runner`."""

import json
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now

from iot.saga.definitions import SagaKeyConflict, SagaRunNotFound, saga_definition_get
from iot.saga.models import ACTIVE_STATUSES, SagaRun, SagaStatus, SagaStepLog, StepPhase
from iot.saga.runner import ACTIVE_STATUSES_SQL, RUNS_TABLE, run_lock, run_queue_on_commit, saga_run_cancel

# One statement decides a key conflict: concurrent starts with one key wait on the partial unique index
# inside Postgres, and exactly one inserts.
_START_SQL = f"""
INSERT INTO {RUNS_TABLE} (id, name, key, status, context, step_index, phase, waiting, attempts,
                     next_run_at, lease_expires_at, created_at, updated_at)
VALUES (%s, %s, %s, '{SagaStatus.RUNNING.value}', %s::jsonb, 0, '{StepPhase.FORWARD.value}', false, 0,
        now(), now() + make_interval(secs => %s), now(), now())
ON CONFLICT (name, key) WHERE status IN ({ACTIVE_STATUSES_SQL}) DO NOTHING
RETURNING id
"""


def saga_start(*, name: str, key: str, context: dict[str, Any] | None = None) -> uuid.UUID:
    """Insert a run of the registered saga `name` and its first step, inside the caller's transaction; the first
    step is queued when that commits. Raises `SagaKeyConflict` (409) if a run of `name` with `key` is active."""
    definition = saga_definition_get(name)
    run_id = uuid.uuid4()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_START_SQL, [run_id, name, key, json.dumps(context or {}), settings.SAGA_LEASE_SECONDS])
            inserted = cursor.fetchone()
        if inserted is None:
            raise SagaKeyConflict(f"A run of {name} with key {key} is already in progress.")
        SagaStepLog.objects.create(run_id=run_id, index=0, name=definition.steps[0].name, phase=StepPhase.FORWARD)
        run_queue_on_commit(run_id)
    return run_id


def saga_signal(*, run_id: uuid.UUID) -> bool:
    """Make a waiting step due now and queue it (after commit). Harmless if the run is not waiting: returns
    whether it was.

    The run's row is locked first (`FOR UPDATE`, waiting for a step in progress): a conditional `UPDATE ...
    WHERE waiting` alone would not wait, because the committed row of a step running for the first time says
    `waiting = false`, and Postgres skips a row whose committed version does not match without waiting for its
    lock; the wake-up would be lost when that step then returns StepWait. After the lock it sees the step's
    outcome. The runner is queued on commit either way: a run whose task was skipped while this held the lock
    is not left to its lease.
    """
    with transaction.atomic():
        run = run_lock(run_id=run_id, skip_locked=False)
        if run is None or run.status not in ACTIVE_STATUSES:
            return False
        woken = run.waiting
        if woken:
            SagaRun.objects.filter(pk=run_id).update(
                next_run_at=Now(),
                lease_expires_at=Now() + timedelta(seconds=settings.SAGA_LEASE_SECONDS),
                updated_at=Now(),
            )
        run_queue_on_commit(run_id)
    return woken


def saga_cancel(*, run_id: uuid.UUID, reason: str) -> bool:
    """Stop a running saga and compensate its completed steps in reverse order; the run ends `cancelled`.

    Serialized with the runner on the run's row lock (waits for a step in progress): a step that committed
    first is compensated, one that had not never takes effect. Returns False if the run had already ended or
    was already compensating after a failure (nothing to cancel); raises `SagaRunNotFound` for an unknown id.
    """
    with transaction.atomic():
        run = run_lock(run_id=run_id, skip_locked=False)
        if run is None:
            raise SagaRunNotFound()
        # Queued on commit whatever happens: a runner task that skipped the row while this held it is not lost.
        run_queue_on_commit(run_id)
        if run.status != SagaStatus.RUNNING:
            return False
        saga_run_cancel(run=run, reason=reason)
    return True
