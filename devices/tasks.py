"""Background work of the device registry: the liveness sweep.

Registration and updates are synchronous; the clock is not. `device_liveness_sweep` runs on
the beat schedule (`device-liveness-sweep` in settings, every DEVICE_LIVENESS_INTERVAL_SECONDS)
and makes the devices silent for DEVICE_INACTIVE_AFTER_SECONDS `inactive`; their next point
makes them `active` again (`devices.services.device_mark_seen`, on every ingest).
"""

import logging

from celery import shared_task
from django.conf import settings

from devices.services import device_mark_inactive

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def device_liveness_sweep() -> int:
    """Mark the silent active devices inactive; returns how many. Idempotent: a second run right
    after finds none, and two at once skip each other's rows (`SKIP LOCKED`).

    No retry policy: a sweep that fails (Postgres or Redis down; each batch rolls back whole) is
    simply the next beat's work, DEVICE_LIVENESS_INTERVAL_SECONDS later.
    """
    changed = device_mark_inactive(silent_seconds=settings.DEVICE_INACTIVE_AFTER_SECONDS)
    if changed:
        logger.info(
            "device liveness: %d devices inactive after %d s of silence",
            changed,
            settings.DEVICE_INACTIVE_AFTER_SECONDS,
        )
    return changed
