from celery import shared_task

from iot.event_queue import event_queue_reconcile


@shared_task(ignore_result=True, autoretry_for=(Exception,), retry_backoff=True, max_retries=3)
def event_queue_reconciliation() -> dict:
    """Periodic (Celery beat): recount the event queue's depth from its stream, and its reservations.
    One Lua script, idempotent."""
    report = event_queue_reconcile()
    return {
        "checked": report.checked,
        "depth_before": report.depth_before,
        "depth_after": report.depth_after,
        "requeued": len(report.requeued),
        "reserved_before": report.reserved_before,
        "reserved_after": report.reserved_after,
    }
