from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _ensure_partitions(sender, using, **kwargs):
    """Every `migrate` leaves the daily partitions of the retention window (and days ahead) in place."""
    from django.db import connections

    from telemetry.models import TABLE
    from telemetry.partitions import telemetry_partitions_ensure

    with connections[using].cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", [TABLE])
        if cursor.fetchone()[0] is None:  # migrated backwards past 0001
            return
    telemetry_partitions_ensure(using=using)


class TelemetryConfig(AppConfig):
    name = "telemetry"

    def ready(self):
        post_migrate.connect(_ensure_partitions, sender=self, dispatch_uid="telemetry-ensure-partitions")
