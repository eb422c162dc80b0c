"""Reads of saga runs: the read-only view steps, `on_finish` and callers get."""

import copy
import uuid

from iot.saga.definitions import SagaRunNotFound, SagaRunView, StepLogView
from iot.saga.models import ACTIVE_STATUSES, SagaRun, SagaStepLog


def saga_run_view(run: SagaRun) -> SagaRunView:
    """`run` with its step log (one query). The context is a copy: a step changes it by returning a dict."""
    logs = list(SagaStepLog.objects.filter(run_id=run.pk).order_by("id"))
    return SagaRunView(
        id=run.pk,
        name=run.name,
        key=run.key,
        status=run.status,
        context=copy.deepcopy(run.context),
        error=run.error,
        # The current step's row is the last one written (a row is inserted when its step becomes current).
        current_step=logs[-1].name if logs and run.status in ACTIVE_STATUSES else None,
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        steps=[
            StepLogView(
                name=log.name,
                phase=log.phase,
                status=log.status,
                attempts=log.attempts,
                error=log.error,
                started_at=log.started_at,
                finished_at=log.finished_at,
            )
            for log in logs
        ],
    )


def saga_get(*, run_id: uuid.UUID) -> SagaRunView:
    run = SagaRun.objects.filter(pk=run_id).first()
    if run is None:
        raise SagaRunNotFound()
    return saga_run_view(run)
