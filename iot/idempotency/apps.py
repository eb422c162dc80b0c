from django.apps import AppConfig


class IdempotencyConfig(AppConfig):
    name = "iot.idempotency"
    label = "idempotency"
    verbose_name = "Idempotency keys"
