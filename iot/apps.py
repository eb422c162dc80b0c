from django.apps import AppConfig


class IotConfig(AppConfig):
    """The project package as an app: management commands and shared templates."""

    name = "iot"
    verbose_name = "Platform"

    def ready(self):
        # Registers the queue's scrape-time gauges in every process that serves /metrics.
        import iot.event_queue  # noqa: F401
        from iot.api.authentication import connect_token_cache_invalidation

        connect_token_cache_invalidation()
