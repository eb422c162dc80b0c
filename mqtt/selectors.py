"""Reads of the mqtt app: which device an MQTT login names, through the device app's own credential lookup."""

import uuid

from devices.models import Device, DeviceStatus
from devices.selectors import device_get, device_get_by_token_hash
from devices.services import device_token_hash


def mqtt_device_id(username: str) -> uuid.UUID | None:
    """The device id an MQTT username names (the device's UUID, any case), or None for anything else."""
    try:
        return uuid.UUID(username)
    except (ValueError, AttributeError, TypeError):
        return None


def mqtt_device_by_credentials(*, device_id: uuid.UUID, token: str) -> Device | None:
    """The live device whose id is `device_id` and whose credential is `token`; None otherwise.

    The lookup HTTP's `Authorization: Device <token>` makes (`devices.authentication`): token hash ->
    device id (cached, a credential never moves to another device), then the device through the
    version-guarded cache, so a device deleted or decommissioned a moment ago is refused at once.
    Two Redis reads, no SQL, on the hot path.
    """
    device = device_get_by_token_hash(token_hash=device_token_hash(token))
    if device is None or device.pk != device_id or device.status == DeviceStatus.DECOMMISSIONED:
        return None
    return device


def mqtt_device_is_live(*, device_id: uuid.UUID) -> bool:
    """The device exists and is not decommissioned (the version-guarded cache: never older than the last write)."""
    device = device_get(device_id=device_id)
    return device is not None and device.status != DeviceStatus.DECOMMISSIONED
