import importlib

from django.apps import AppConfig


class SagaConfig(AppConfig):
    name = "iot.saga"
    label = "saga"
    verbose_name = "Sagas"

    def ready(self):
        from django.conf import settings

        # Registers the outcome counters in every process that serves /metrics.
        import iot.saga.metrics  # noqa: F401

        # Extra modules that register definitions at import (the owning apps register theirs in ready()).
        for module in settings.SAGA_DEFINITION_MODULES:
            importlib.import_module(module)
