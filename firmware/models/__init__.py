"""The firmware app's tables: releases (with their artifacts), updates of one device each, and staged
rollouts of a release to many devices.

One module per concept (`releases`, `updates`, `rollouts`).
"""

from firmware.models.releases import FirmwareRelease
from firmware.models.rollouts import (
    ROLLOUT_ACTIVE_STATUSES,
    ROLLOUT_FINAL_STATUSES,
    FirmwareRollout,
    FirmwareRolloutStage,
    FirmwareRolloutTarget,
    RolloutStatus,
)
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
    "ROLLOUT_ACTIVE_STATUSES",
    "ROLLOUT_FINAL_STATUSES",
    "STAGE_RANK",
    "DeviceResult",
    "FirmwareRelease",
    "FirmwareRollout",
    "FirmwareRolloutStage",
    "FirmwareRolloutTarget",
    "FirmwareUpdate",
    "RolloutStatus",
    "UpdateStatus",
]
