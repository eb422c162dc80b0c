from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"

    def ready(self):
        from alerts.selectors import RULE_VERSIONS_SQL
        from alerts.services import alerts_evaluate
        from telemetry.services import telemetry_points_stored_hook_register

        # Every accepted point is evaluated inside the transaction that stores it; the insert
        # statement also returns the versions of the device's rule scopes (no round trip of its own).
        telemetry_points_stored_hook_register(hook=alerts_evaluate, sql={"rule_versions": RULE_VERSIONS_SQL})
