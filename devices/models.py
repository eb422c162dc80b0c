import uuid

from django.db import models
from django.utils import timezone


class DeviceStatus(models.TextChoices):
    REGISTERED = "registered"
    ACTIVE = "active"
    INACTIVE = "inactive"
    MAINTENANCE = "maintenance"
    DECOMMISSIONED = "decommissioned"


class Device(models.Model):
    """A physical device in the fleet, identified by its manufacturer serial number.

    `serial_number` is unique in the database, which is what makes concurrent
    registrations of one device collapse into one row. `version` is bumped by
    every write (in the same UPDATE) and guards the read cache (`iot.cache`).
    The device's own credential is stored only as a SHA-256 of a random token.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    serial_number = models.CharField(max_length=128, unique=True)
    device_type = models.CharField(max_length=64)
    firmware_version = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=DeviceStatus.choices, default=DeviceStatus.REGISTERED)
    location = models.CharField(max_length=255, null=True, blank=True)
    group_id = models.CharField(max_length=128, null=True, blank=True, db_index=True)
    metadata = models.JSONField(default=dict, blank=True)
    registered_at = models.DateTimeField(default=timezone.now, editable=False)
    last_seen = models.DateTimeField(null=True, blank=True, editable=False)
    updated_at = models.DateTimeField(default=timezone.now, editable=False)
    version = models.BigIntegerField(default=1, editable=False, help_text="Bumped by every write; guards the cache.")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)

    class Meta:
        ordering = ("-registered_at", "-id")
        indexes = [
            models.Index(fields=["status", "-registered_at"], name="device_status_registered"),
            models.Index(fields=["-registered_at", "-id"], name="device_registered_id"),
        ]

    def __str__(self) -> str:
        return self.serial_number
