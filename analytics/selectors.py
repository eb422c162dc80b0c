"""Reads of the analytics app: the fleet, a group, a device, composed from the apps that own the data.

Every figure is real and each endpoint costs the same number of round trips for 10 devices or
100 000, because each part is one aggregate or one pipelined call:

| figure | from | cost |
| --- | --- | --- |
| devices by status, average uptime | `devices.selectors.device_fleet_summary` | 1 aggregate query |
| messages (exact), latency | `telemetry.selectors.telemetry_*_message_*` | 1 query + 1 Redis round trip |
| messages per second | `telemetry.selectors.telemetry_messages_per_second` | 1 Redis round trip |
| active alerts | `alerts.selectors.alert_active_count` | 1 count query |
| pending updates | `firmware.selectors.firmware_update_active_count` | 1 count query |
| errors (refused submissions) | `telemetry.selectors.telemetry_device_error_count` | 1 Redis round trip |

Uptime is `last_seen - registered_at` (0 for a device never seen), as the seed defined it;
a device is `active` until `DEVICE_INACTIVE_AFTER_SECONDS` pass without a point.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings

from alerts.selectors import alert_active_count
from devices.models import DeviceStatus
from devices.selectors import device_fleet_summary, device_get
from firmware.selectors import firmware_update_active_count
from telemetry.selectors import (
    telemetry_device_error_count,
    telemetry_device_message_stats,
    telemetry_fleet_message_stats,
    telemetry_group_message_count,
    telemetry_messages_per_second,
)


@dataclass(frozen=True)
class FleetAnalytics:
    total_devices: int
    active_devices: int
    inactive_devices: int
    devices_by_status: dict[str, int]
    total_messages: int
    messages_per_second: float
    average_latency_ms: float | None
    active_alerts: int
    pending_updates: int
    average_uptime_seconds: float


@dataclass(frozen=True)
class GroupAnalytics:
    group_id: str
    device_count: int
    active_count: int
    total_messages: int
    alert_count: int
    average_uptime_seconds: float


@dataclass(frozen=True)
class DeviceAnalytics:
    device_id: uuid.UUID
    status: str
    uptime_seconds: float
    message_count: int
    last_seen: datetime | None
    error_count: int
    average_latency_ms: float | None


def fleet_analytics() -> FleetAnalytics:
    summary = device_fleet_summary()
    messages = telemetry_fleet_message_stats()
    return FleetAnalytics(
        total_devices=summary.total,
        active_devices=summary.by_status[DeviceStatus.ACTIVE],
        inactive_devices=summary.by_status[DeviceStatus.INACTIVE],
        devices_by_status=summary.by_status,
        total_messages=messages.messages,
        messages_per_second=telemetry_messages_per_second(window_seconds=settings.ANALYTICS_RATE_WINDOW_SECONDS),
        average_latency_ms=messages.average_latency_ms,
        active_alerts=alert_active_count(),
        pending_updates=firmware_update_active_count(),
        average_uptime_seconds=summary.average_uptime_seconds,
    )


def group_analytics(*, group_id: str) -> GroupAnalytics:
    summary = device_fleet_summary(group_id=group_id)
    return GroupAnalytics(
        group_id=group_id,
        device_count=summary.total,
        active_count=summary.by_status[DeviceStatus.ACTIVE],
        total_messages=telemetry_group_message_count(group_id=group_id),
        alert_count=alert_active_count(group_id=group_id),
        average_uptime_seconds=summary.average_uptime_seconds,
    )


def device_analytics(*, device_id: uuid.UUID) -> DeviceAnalytics | None:
    device = device_get(device_id=device_id)
    if device is None:
        return None
    messages = telemetry_device_message_stats(device_id=device_id)
    uptime = (device.last_seen - device.registered_at).total_seconds() if device.last_seen else 0.0
    return DeviceAnalytics(
        device_id=device.pk,
        status=device.status,
        uptime_seconds=max(uptime, 0.0),
        message_count=messages.messages,
        last_seen=device.last_seen,
        error_count=telemetry_device_error_count(device_id=device_id),
        average_latency_ms=messages.average_latency_ms,
    )
