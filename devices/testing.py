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
