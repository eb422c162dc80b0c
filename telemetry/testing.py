"""The telemetry app's part of the test kit (the shared part is `iot/testing/`, which imports no domain app)."""

import uuid

from telemetry.models import TelemetryPoint


def stored_points(django_db_blocker, device_id: str | uuid.UUID) -> int:
    """Points of the device in Postgres (what a `202` promised), read from a live test."""
    with django_db_blocker.unblock():
        return TelemetryPoint.objects.filter(device_id=device_id).count()
