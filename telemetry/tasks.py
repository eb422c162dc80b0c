"""Background work of the telemetry app: partition maintenance; the reconciliation of message counts.

Runs on the beat schedule (`telemetry-partitions-maintain` in settings) and once
whenever a Celery worker starts, so a platform that was down over midnight (or
for days) gets its partitions back before traffic needs them.
"""

import logging

from celery import shared_task
from celery.signals import worker_ready
from django.db import DatabaseError

from telemetry.partitions import telemetry_partitions_maintain
from telemetry.services import telemetry_message_counts_reconcile

logger = logging.getLogger(__name__)


@shared_task(
    ignore_result=True,
    autoretry_for=(DatabaseError,),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=5,
)
def telemetry_partitions_maintenance() -> dict[str, list[str]]:
    """Create the missing daily partitions and drop the expired ones. Idempotent (safe to run concurrently).

    A lock timeout (busy table) or a lost connection is a DatabaseError: retried with backoff.
    """
    report = telemetry_partitions_maintain()
    if report.created or report.dropped:
        logger.info("telemetry partitions: created %s, dropped %s", report.created, report.dropped)
    return {"created": report.created, "dropped": report.dropped}


@worker_ready.connect(dispatch_uid="telemetry-partitions-on-worker-start")
def _maintain_on_worker_start(sender=None, **kwargs):
    telemetry_partitions_maintenance.delay()


@shared_task(
    ignore_result=True, autoretry_for=(DatabaseError,), retry_backoff=True, retry_backoff_max=60, max_retries=3
)
def telemetry_message_counts_reconciliation() -> int:
    """Count the closed minutes from Postgres (beat, `telemetry-message-counts-reconcile`); returns the points added."""
    return telemetry_message_counts_reconcile().messages
