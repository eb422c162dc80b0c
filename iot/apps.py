from django.apps import AppConfig


class IotConfig(AppConfig):
    """The project package as an app: management commands and shared templates."""

    name = "iot"
    verbose_name = "Platform"
