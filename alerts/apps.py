from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"

    def ready(self):
        from alerts.services import alerts_evaluate
        from telemetry.services import telemetry_points_stored_hook_register

        # Every accepted point is evaluated inside the transaction that stores it.
        telemetry_points_stored_hook_register(hook=alerts_evaluate)
