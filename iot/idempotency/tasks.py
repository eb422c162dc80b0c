from celery import shared_task

from iot.idempotency.services import idempotency_keys_delete_expired


@shared_task(ignore_result=True, autoretry_for=(Exception,), retry_backoff=True, max_retries=3)
def idempotency_keys_cleanup() -> int:
    """Periodic (Celery beat): drop expired idempotency keys. Idempotent by nature."""
    return idempotency_keys_delete_expired()
