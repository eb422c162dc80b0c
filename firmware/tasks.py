"""Background work of the firmware app: advancing staged rollouts.

An update runs as a durable saga ("firmware.update", `firmware.saga`), advanced by the saga
runner's tasks (`iot.saga.tasks.saga_advance`, queued on commit by every step, and the
`saga_sweep` beat task that re-queues lost runs and passed deadlines): the retry policy and
the schedule live in the run's row, not here.

A rollout is advanced by `rollout_advance` (by id), queued after the commit that ends one of its
updates, starts, resumes or cancels it, and by itself while a stage's updates are being created;
and by `rollouts_advance` (beat, `firmware-rollouts-advance`) for every rollout with work left, so
a lost task delays a rollout by one beat interval at most. The advance is idempotent and
serialized on the rollout's row (`firmware.rollouts`): duplicates are harmless.
"""

import uuid

from celery import shared_task
from django.db import DatabaseError

from firmware.rollouts import firmware_rollout_advance, rollout_advance_claim
from firmware.selectors import rollout_ids_unsettled


@shared_task(
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(DatabaseError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def rollout_advance(rollout_id: str) -> str:
    """Do what the rollout needs now (a stage's next updates, the next stage, a stop, cancellations)."""
    parsed = uuid.UUID(rollout_id)
    rollout_advance_claim(parsed)  # before reading: an update ending from now on queues another advance
    return firmware_rollout_advance(rollout_id=parsed)


@shared_task(ignore_result=True)
def rollouts_advance() -> int:
    """Queue an advance of every rollout not settled (running, paused, or still cancelling); returns how many."""
    rollout_ids = rollout_ids_unsettled()
    for rollout_id in rollout_ids:
        rollout_advance.delay(str(rollout_id))
    return len(rollout_ids)
