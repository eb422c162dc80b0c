"""Background work of the alerts app: delivering the notification outbox.

`notification_deliver` is queued after the commit that writes a notification
(`alerts.services.notifications_record`) and requeues itself, with a countdown, while
the row is being retried; the retry policy (backoff, breaker, expiry) lives in
`alerts.services.notification_deliver_attempt` and the row, not in Celery's retry
machinery, so a lost task loses nothing: `notifications_sweep` (beat,
`alert-notifications-sweep` in settings) re-queues every pending row overdue by more
than one sweep interval. Duplicate tasks for one row are harmless: only the one whose
conditional UPDATE claims the row sends it.
"""

import logging
import uuid

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError

from alerts.selectors import notifications_due
from alerts.services import notification_deliver_attempt

logger = logging.getLogger(__name__)


@shared_task(
    ignore_result=True, autoretry_for=(DatabaseError,), retry_backoff=True, retry_backoff_max=60, max_retries=5
)
def notification_deliver(notification_id: str) -> str:
    """Attempt one delivery; when the row is due again later, queue this task for then."""
    result = notification_deliver_attempt(notification_id=uuid.UUID(notification_id))
    if result.retry_in_seconds is not None:
        notification_deliver.apply_async(args=[notification_id], countdown=result.retry_in_seconds)
    return result.outcome


@shared_task(ignore_result=True)
def notifications_sweep() -> int:
    """Re-queue the pending rows whose task was lost (worker killed, broker restarted); returns how many."""
    grace = settings.ALERT_NOTIFICATION_SWEEP_INTERVAL_SECONDS
    ids = notifications_due(overdue_seconds=grace, limit=settings.ALERT_NOTIFICATION_SWEEP_BATCH)
    for notification_id in ids:
        notification_deliver.delay(str(notification_id))
    if ids:
        logger.info("notification sweeper re-queued %d overdue notifications", len(ids))
    return len(ids)
