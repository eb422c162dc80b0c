"""Celery tasks of the saga runner. They carry only a run id: the state, the retry policy and the schedule live
in the run's row (`iot.saga.runner`), so a lost or duplicated task changes nothing. `saga_advance` is
acknowledged late and re-queued if its worker dies (`CELERY_TASK_ACKS_LATE`, `CELERY_TASK_REJECT_ON_WORKER_LOST`);
whatever it misses, `saga_sweep` (beat, `saga-sweep`) queues again once the run's lease has expired.
"""

import uuid

from celery import shared_task
from django.db import DatabaseError

from iot.saga.runner import saga_advance_run, saga_runs_requeue


@shared_task(
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(DatabaseError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def saga_advance(run_id: str) -> str:
    """Run whatever the run needs now (a due step or compensation, or nothing)."""
    return saga_advance_run(run_id=uuid.UUID(run_id))


@shared_task(ignore_result=True)
def saga_sweep() -> int:
    """Queue again the due runs whose task was lost or never queued (StepWait deadlines); returns how many."""
    return len(saga_runs_requeue())
