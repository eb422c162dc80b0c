"""The devices app's part of the test kit: devices made through the service, as an API registration makes
them (the shared part is `iot/testing/`, which imports no domain app)."""

import uuid
from typing import Any

from devices.services import DeviceRegistration, device_register


def device_create(
    *,
    serial_prefix: str = "SN-TEST",
    device_type: str = "sensor",
    firmware_version: str = "1.0.0",
    location: str | None = None,
    group_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> DeviceRegistration:
    """A newly registered device (serial number `<serial_prefix>-<32 hex>`) and its one-time token."""
    return device_register(
        serial_number=f"{serial_prefix}-{uuid.uuid4().hex}",
        device_type=device_type,
        firmware_version=firmware_version,
        location=location,
        group_id=group_id,
        metadata=metadata,
    )


def devices_bulk_create(
    *,
    count: int,
    group_id: str | None = None,
    status: str = "registered",
    seen_seconds_after_registration: float | None = None,
) -> list:
    """`count` devices in one INSERT (for tests and benches that need a big fleet fast), all alike:
    in `group_id`, with `status`, and `last_seen` that many seconds after `registered_at` (or never)."""
    from datetime import timedelta

    from django.utils import timezone

    from devices.models import Device

    registered = timezone.now() - timedelta(days=1)
    last_seen = (
        None
        if seen_seconds_after_registration is None
        else registered + timedelta(seconds=seen_seconds_after_registration)
    )
    return Device.objects.bulk_create(
        Device(
            serial_number=f"BULK-{uuid.uuid4().hex}",
            device_type="sensor",
            firmware_version="1.0.0",
            group_id=group_id,
            status=status,
            registered_at=registered,
            last_seen=last_seen,
            token_hash=uuid.uuid4().hex + uuid.uuid4().hex,
        )
        for _ in range(count)
    )
