"""The saga primitive's part of the test kit: run a saga in the test's own process, and keep its tasks
away from Celery. For tests of code that starts sagas (e.g. an app's own saga definitions)."""

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from iot.saga.definitions import SagaRunView
from iot.saga.models import ACTIVE_STATUSES, SagaRun
from iot.saga.runner import saga_advance_run
from iot.saga.selectors import saga_get


@contextmanager
def saga_queue_capture() -> Iterator[list[tuple[uuid.UUID, float | None]]]:
    """Instead of queuing `saga_advance` tasks, record (run id, countdown) for each, in order."""
    queued: list[tuple[uuid.UUID, float | None]] = []
    with mock.patch("iot.saga.runner.run_queue", lambda run_id, countdown=None: queued.append((run_id, countdown))):
        yield queued


def saga_drive(*, run_id: uuid.UUID, timeout: float = 10.0) -> SagaRunView:
    """Advance the run here, as workers would, until it has ended or waits on a StepWait; returns it then.

    A step retried after a backoff is waited for (set SAGA_RETRY_*_SECONDS to milliseconds in tests),
    polling until `timeout` (then AssertionError).
    """
    deadline = time.monotonic() + timeout
    while True:
        outcome = saga_advance_run(run_id=run_id)
        run = SagaRun.objects.get(pk=run_id)
        if run.status not in ACTIVE_STATUSES or (run.waiting and outcome in ("waiting", "not_due")):
            return saga_get(run_id=run_id)
        if time.monotonic() >= deadline:
            raise AssertionError(f"saga run {run_id} still {run.status} after {timeout}s (last: {outcome})")
        if outcome in ("not_due", "skipped"):
            time.sleep(0.005)
