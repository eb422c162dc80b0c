"""Reads for the fleet dashboard in the admin (the index page) and the panels of a device's admin page.

The dashboard is polled every few seconds by every fleet manager who has it open, so it costs the
same at 10 devices or 100 000: every figure is one aggregate or one short indexed read, never a
query per device.

| panel | from | cost |
| --- | --- | --- |
| devices by status | `devices.selectors.device_fleet_summary` | 1 `GROUP BY` query |
| ingestion, last hour | `telemetry.selectors.telemetry_messages_per_minute` | 1 pipelined Redis round trip |
| points per second now | `telemetry.selectors.telemetry_messages_per_second` | 1 pipelined Redis round trip |
| open alerts by severity | `alerts.selectors.alert_active_counts_by_severity` | 1 `GROUP BY` query |
| newest open alerts | `alerts.selectors.alert_list` | 1 query (`LIMIT`) |
| firmware versions | `devices.selectors.device_firmware_versions` | 1 `GROUP BY` query |
| updates in progress | `firmware.selectors.update_list` | 1 `GROUP BY` query + 1 query (`LIMIT`) |
| rollouts in progress | `firmware.selectors.rollout_list_active` | 1 `GROUP BY` query (their updates by status) |
| not seen recently | `devices.selectors.device_list` | 1 query (`LIMIT`) |

That is 8 queries and 2 Redis round trips per refresh. Measured (`bench/dashboard.py`, in process,
2 loaded cores): at 100 000 devices a refresh takes 115 ms (JSON) / 139 ms (HTML, p50), of which the
two `GROUP BY`s over the fleet (status, firmware version) are ~50 ms each; 19-34 ms at 1 000 devices.
"""

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, F
from django.utils import timezone

from alerts.models import ACTIVE_STATUSES as ALERT_ACTIVE_STATUSES
from alerts.models import AlertSeverity
from alerts.selectors import alert_active_counts_by_severity, alert_list
from devices.models import DeviceStatus
from devices.selectors import device_firmware_versions, device_fleet_summary, device_list
from firmware.models import ACTIVE_STATUSES as UPDATE_ACTIVE_STATUSES
from firmware.selectors import rollout_list_active, update_list
from telemetry.selectors import telemetry_messages_per_minute, telemetry_messages_per_second, telemetry_points_query
from telemetry.series import SeriesBucket, telemetry_series

INGESTION_MINUTES = 60
NEWEST_ALERTS = 8
FIRMWARE_VERSIONS_SHOWN = 8
UPDATES_SHOWN = 8
SILENT_DEVICES_SHOWN = 8
# Severities from the most to the least urgent, the order a person scans them in.
SEVERITY_ORDER = (AlertSeverity.CRITICAL, AlertSeverity.WARNING, AlertSeverity.INFO)


@dataclass(frozen=True)
class AlertRow:
    id: uuid.UUID
    device_id: uuid.UUID
    device_serial_number: str
    severity: str
    status: str
    metric: str
    operator: str
    threshold: float
    last_value: float
    occurrences: int
    created_at: datetime
    last_triggered_at: datetime


@dataclass(frozen=True)
class UpdateRow:
    id: uuid.UUID
    device_id: uuid.UUID
    device_serial_number: str
    from_version: str
    to_version: str
    status: str
    progress: int
    started_at: datetime


@dataclass(frozen=True)
class RolloutProgress:
    """One staged rollout running or paused (from `firmware.selectors.rollout_list_active()`): its targets,
    those it is done with (update ended, or skipped) and those whose update failed. With none, the
    dashboard's firmware panel shows the single-device updates in progress instead."""

    id: uuid.UUID
    name: str
    to_version: str
    devices_total: int
    devices_done: int
    devices_failed: int
    status: str

    @property
    def percent_done(self) -> int:
        return round(100 * self.devices_done / self.devices_total) if self.devices_total else 0


@dataclass(frozen=True)
class SilentDevice:
    id: uuid.UUID
    serial_number: str
    device_type: str
    group_id: str | None
    firmware_version: str
    last_seen: datetime | None


@dataclass(frozen=True)
class FleetDashboard:
    generated_at: datetime
    devices_total: int
    devices_by_status: dict[str, int]
    # (minute start, points received in it), oldest first; the last minute is the current, unfinished one.
    ingestion_per_minute: list[tuple[datetime, int]]
    messages_last_hour: int
    messages_per_second: float
    alerts_by_severity: dict[str, int]
    alerts_newest: list[AlertRow]
    # (version, devices), most common first; decommissioned devices left out.
    firmware_versions: list[tuple[str, int]]
    firmware_versions_other: int
    updates_by_status: dict[str, int]
    updates_newest: list[UpdateRow]
    silent_devices: list[SilentDevice]
    silent_after_seconds: int
    rollouts: list[RolloutProgress] = field(default_factory=list)

    @property
    def alerts_total(self) -> int:
        return sum(self.alerts_by_severity.values())

    @property
    def updates_total(self) -> int:
        return sum(self.updates_by_status.values())

    @property
    def devices_silent(self) -> int:
        return self.devices_by_status[DeviceStatus.INACTIVE]


def _alert_rows(alerts) -> list[AlertRow]:
    return [
        AlertRow(
            id=alert.pk,
            device_id=alert.device_id,
            device_serial_number=alert.device.serial_number,
            severity=alert.severity,
            status=alert.status,
            metric=alert.metric,
            operator=alert.operator,
            threshold=alert.threshold,
            last_value=alert.last_value,
            occurrences=alert.occurrences,
            created_at=alert.created_at,
            last_triggered_at=alert.last_triggered_at,
        )
        for alert in alerts
    ]


def alerts_newest_active(*, limit: int = NEWEST_ALERTS) -> list[AlertRow]:
    """The newest open or acknowledged alerts of the fleet, with their device's serial number: one query."""
    return _alert_rows(alert_list().filter(status__in=ALERT_ACTIVE_STATUSES).select_related("device")[:limit])


def _update_rows(updates) -> list[UpdateRow]:
    return [
        UpdateRow(
            id=update.pk,
            device_id=update.device_id,
            device_serial_number=update.device.serial_number,
            from_version=update.from_version,
            to_version=update.to_version,
            status=update.status,
            progress=update.progress,
            started_at=update.started_at,
        )
        for update in updates
    ]


def firmware_updates_in_progress(*, limit: int = UPDATES_SHOWN) -> tuple[dict[str, int], list[UpdateRow]]:
    """Updates not finished yet, counted by stage (every active stage present), and the newest `limit`
    of them: two queries. The stand-in for staged rollouts until firmware has them."""
    counts = dict(update_list(active=True).values_list("status").annotate(n=Count("pk")).order_by())
    by_status = {status: counts.get(status, 0) for status in UPDATE_ACTIVE_STATUSES}
    newest = update_list(active=True).select_related("device")[:limit]
    return by_status, _update_rows(newest)


def devices_silent(*, limit: int = SILENT_DEVICES_SHOWN) -> list[SilentDevice]:
    """Devices the liveness sweep made `inactive` (no point for `DEVICE_INACTIVE_AFTER_SECONDS`), the most
    recently lost first: those are the ones someone may still catch. One query; the total is the
    `inactive` count of the fleet summary."""
    devices = (
        device_list(status=DeviceStatus.INACTIVE)
        .order_by(F("last_seen").desc(nulls_last=True), "id")
        .only("id", "serial_number", "device_type", "group_id", "firmware_version", "last_seen")[:limit]
    )
    return [
        SilentDevice(
            id=device.pk,
            serial_number=device.serial_number,
            device_type=device.device_type,
            group_id=device.group_id,
            firmware_version=device.firmware_version,
            last_seen=device.last_seen,
        )
        for device in devices
    ]


def rollouts_in_progress() -> list[RolloutProgress]:
    """The running and paused rollouts, newest first: one query for all of them."""
    return [
        RolloutProgress(
            id=rollout.id,
            name=rollout.name,
            to_version=rollout.to_version,
            devices_total=rollout.counts.targets,
            devices_done=rollout.counts.done,
            devices_failed=rollout.counts.failed,
            status=rollout.status,
        )
        for rollout in rollout_list_active()
    ]


def fleet_dashboard() -> FleetDashboard:
    """Everything the fleet dashboard shows, in 8 queries and 2 Redis round trips (see the module docstring)."""
    summary = device_fleet_summary()
    per_minute = telemetry_messages_per_minute(minutes=INGESTION_MINUTES)
    versions = device_firmware_versions(limit=FIRMWARE_VERSIONS_SHOWN)
    running = summary.total - summary.by_status[DeviceStatus.DECOMMISSIONED]
    by_severity = alert_active_counts_by_severity()
    updates_by_status, updates_newest = firmware_updates_in_progress()
    return FleetDashboard(
        generated_at=timezone.now(),
        devices_total=summary.total,
        devices_by_status=summary.by_status,
        ingestion_per_minute=per_minute,
        messages_last_hour=sum(count for _, count in per_minute),
        messages_per_second=telemetry_messages_per_second(window_seconds=settings.ANALYTICS_RATE_WINDOW_SECONDS),
        alerts_by_severity={severity: by_severity.get(severity, 0) for severity in SEVERITY_ORDER},
        alerts_newest=alerts_newest_active(),
        firmware_versions=versions,
        firmware_versions_other=max(running - sum(n for _, n in versions), 0),
        updates_by_status=updates_by_status,
        updates_newest=updates_newest,
        silent_devices=devices_silent(),
        silent_after_seconds=settings.DEVICE_INACTIVE_AFTER_SECONDS,
        rollouts=rollouts_in_progress(),
    )


# --- a device's admin page -----------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    key: str
    label: str
    span: timedelta
    bucket_seconds: int  # 60 to 170 buckets a chart: one dot every few pixels


TIME_RANGES = {
    "1h": TimeRange("1h", "1 hour", timedelta(hours=1), 60),
    "24h": TimeRange("24h", "24 hours", timedelta(hours=24), 15 * 60),
    "7d": TimeRange("7d", "7 days", timedelta(days=7), 3600),
}
DEFAULT_TIME_RANGE = "1h"
DEVICE_ALERTS_SHOWN = 20
DEVICE_UPDATES_SHOWN = 20
DEVICE_METRICS_SHOWN = 8
# The device's newest points in the range looked at to find which metrics it sent (see `device_metric_series`).
DEVICE_METRICS_SCAN_POINTS = 1000


def time_range_parse(value: str | None) -> TimeRange:
    """The picker's range; anything unknown is the default (a hand-edited URL shows the default, not an error)."""
    return TIME_RANGES.get(value or "", TIME_RANGES[DEFAULT_TIME_RANGE])


def device_alerts(*, device_id: uuid.UUID, limit: int = DEVICE_ALERTS_SHOWN) -> list[AlertRow]:
    """The device's alerts, newest first, whatever their status: one query on `(device, -created_at)`."""
    return _alert_rows(alert_list(device_id=device_id).select_related("device").order_by("-created_at", "-id")[:limit])


def device_update_history(*, device_id: uuid.UUID, limit: int = DEVICE_UPDATES_SHOWN) -> list[UpdateRow]:
    """The device's firmware updates, newest first: one query on `(device, -started_at)`."""
    updates = update_list(device_id=device_id).select_related("device").order_by("-started_at", "-id")
    return _update_rows(updates[:limit])


@dataclass(frozen=True)
class MetricSeries:
    metric: str
    latest_value: float
    latest_at: datetime
    # Average per bucket (`telemetry.series`, computed by Postgres), oldest first; empty buckets left out.
    buckets: list[SeriesBucket]


@dataclass(frozen=True)
class DeviceTelemetry:
    start: datetime
    end: datetime
    bucket_seconds: int
    metrics: list[MetricSeries]


def device_telemetry(*, device_id: uuid.UUID, time_range: TimeRange, end: datetime | None = None) -> DeviceTelemetry:
    """The device's metrics over the range, each as averages per bucket: 1 query to find the metrics,
    then 1 aggregate query per metric (at most DEVICE_METRICS_SHOWN, in name order).

    The metrics are those among the device's newest DEVICE_METRICS_SCAN_POINTS points in the range
    (`telemetry.selectors.telemetry_points_query`: a skip scan, one index probe per metric), which is
    every metric a device sends in the same batches; one that stopped while the others went on for that
    many more points is not charted. A selector listing a device's metrics would lift this.
    """
    end = end or timezone.now()
    start = end - time_range.span
    newest = telemetry_points_query(
        device_id=device_id, start_time=start, end_time=end, limit=DEVICE_METRICS_SCAN_POINTS
    )
    latest = {}
    for point in newest:  # newest first: the first of each metric is its latest
        latest.setdefault(point.metric, point)
    metrics = []
    for metric in sorted(latest)[:DEVICE_METRICS_SHOWN]:
        series = telemetry_series(
            device_id=device_id,
            metric=metric,
            agg="avg",
            interval_seconds=time_range.bucket_seconds,
            start_time=start,
            end_time=end,
        )
        point = latest[metric]
        metrics.append(
            MetricSeries(metric=metric, latest_value=point.value, latest_at=point.ts, buckets=series.buckets)
        )
    return DeviceTelemetry(start=start, end=end, bucket_seconds=time_range.bucket_seconds, metrics=metrics)
