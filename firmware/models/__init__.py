"""The firmware app's tables: releases (with their artifacts) and updates of one device each.

One module per concept (`releases`, `updates`); a later `rollouts` module adds staged rollouts.
"""

from firmware.models.releases import FirmwareRelease
from firmware.models.updates import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    STAGE_RANK,
    DeviceResult,
    FirmwareUpdate,
    UpdateStatus,
)

__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "STAGE_RANK",
    "DeviceResult",
    "FirmwareRelease",
    "FirmwareUpdate",
    "UpdateStatus",
]
