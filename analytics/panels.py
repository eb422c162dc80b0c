"""What the admin's fleet templates are given: the figures of `analytics.dashboard`, drawn as SVG
(`analytics.charts`) and linked to the admin's filtered lists. Presentation only; every read is a
selector of `analytics.dashboard`."""

import uuid
from dataclasses import asdict
from typing import Any
from urllib.parse import urlencode

from django.urls import reverse
from django.utils import timezone

from alerts.models import AlertSeverity
from analytics import charts
from analytics.dashboard import (
    INGESTION_MINUTES,
    TIME_RANGES,
    FleetDashboard,
    TimeRange,
    device_alerts,
    device_telemetry,
    device_update_history,
    fleet_dashboard,
)
from devices.models import DeviceStatus

# Seconds between two refreshes of an open page (a fetch of the fragment view; paused while the tab is hidden).
DASHBOARD_REFRESH_SECONDS = 5
DEVICE_PANELS_REFRESH_SECONDS = 15

# The order a fleet manager reads the fleet in: what works, what went quiet, what never spoke, what is held.
STATUS_ORDER = (
    DeviceStatus.ACTIVE,
    DeviceStatus.INACTIVE,
    DeviceStatus.REGISTERED,
    DeviceStatus.MAINTENANCE,
    DeviceStatus.DECOMMISSIONED,
)
STATUS_LABELS = {
    DeviceStatus.ACTIVE: "Active",
    DeviceStatus.INACTIVE: "Not seen recently",
    DeviceStatus.REGISTERED: "Registered, never seen",
    DeviceStatus.MAINTENANCE: "In maintenance",
    DeviceStatus.DECOMMISSIONED: "Decommissioned",
}


def _changelist(name: str, **filters: str) -> str:
    url = reverse(f"admin:{name}_changelist")
    return f"{url}?{urlencode(filters)}" if filters else url


def fleet_dashboard_context(dashboard: FleetDashboard | None = None) -> dict[str, Any]:
    """The template context of the fleet dashboard fragment (`admin/analytics/fleet_dashboard.html`)."""
    dashboard = dashboard or fleet_dashboard()
    total = dashboard.devices_total
    statuses = [
        {
            "key": status.value,
            "label": STATUS_LABELS[status],
            "value": dashboard.devices_by_status[status],
            "percent": round(100 * dashboard.devices_by_status[status] / total, 1) if total else 0,
            "href": _changelist("devices_device", status__exact=status.value),
        }
        for status in STATUS_ORDER
    ]
    status_chart = charts.stacked_bar(
        name="devices-by-status",
        label=f"{total} devices by status",
        segments=[
            charts.Segment(
                key=row["key"], value=row["value"], label=row["label"], css_class=f"fleet-status-{row['key']}"
            )
            for row in statuses
        ],
    )
    minutes = dashboard.ingestion_per_minute
    bars = []
    for index, (minute, count) in enumerate(minutes):
        clock = timezone.localtime(minute).strftime("%H:%M")
        last = index == len(minutes) - 1
        tick = "now" if last else clock if index % 15 == 0 else ""
        bars.append(
            charts.Bar(
                value=count,
                label=f"{clock} (so far)" if last else clock,
                css_class="fleet-bar--partial" if last else "",
                tick=tick,
            )
        )
    ingestion_chart = charts.column_chart(
        name="ingestion",
        bars=bars,
        unit="points",
        label=f"Points received per minute over the last {INGESTION_MINUTES} minutes",
    )
    severities = [
        {
            "key": severity,
            "label": AlertSeverity(severity).label.capitalize(),
            "value": count,
            "href": _changelist("alerts_alert", severity__exact=severity, status__exact="open"),
        }
        for severity, count in dashboard.alerts_by_severity.items()
    ]
    version_rows = [
        charts.Row(
            label=version,
            value=n,
            css_class="fleet-hbar--firmware",
            href=_changelist("devices_device", firmware_version__exact=version),
        )
        for version, n in dashboard.firmware_versions
    ]
    if dashboard.firmware_versions_other:
        version_rows.append(
            charts.Row(label="other versions", value=dashboard.firmware_versions_other, css_class="fleet-hbar--other")
        )
    update_stages = charts.stacked_bar(
        name="updates-by-status",
        label=f"{dashboard.updates_total} firmware updates in progress by stage",
        segments=[
            charts.Segment(key=status, value=n, label=status.capitalize(), css_class=f"fleet-stage-{status}")
            for status, n in dashboard.updates_by_status.items()
        ],
    )
    return {
        "dashboard": dashboard,
        "statuses": statuses,
        "status_chart": status_chart,
        "ingestion_chart": ingestion_chart,
        "ingestion_peak": max((count for _, count in minutes), default=0),
        "severities": severities,
        "firmware_chart": charts.hbar_chart(
            name="firmware-versions", rows=version_rows, label="Devices per firmware version"
        )
        if version_rows
        else None,
        "update_stages": update_stages,
        "update_stage_rows": [
            {"key": status, "label": status.capitalize(), "value": n}
            for status, n in dashboard.updates_by_status.items()
        ],
        "silent_after_minutes": round(dashboard.silent_after_seconds / 60),
        "links": {
            "devices": _changelist("devices_device"),
            "silent": _changelist("devices_device", status__exact=DeviceStatus.INACTIVE.value),
            "alerts": _changelist("alerts_alert", status__exact="open"),
            "updates": _changelist("firmware_firmwareupdate"),
        },
    }


def fleet_dashboard_json(dashboard: FleetDashboard) -> dict[str, Any]:
    """The dashboard's figures as JSON (the same ones the page draws), for scripts and tests."""
    data = asdict(dashboard)
    data["ingestion_per_minute"] = [
        {"minute": minute.isoformat(), "points": count} for minute, count in dashboard.ingestion_per_minute
    ]
    data["firmware_versions"] = [{"version": version, "devices": n} for version, n in dashboard.firmware_versions]
    data["alerts_total"] = dashboard.alerts_total
    data["updates_total"] = dashboard.updates_total
    return data


def device_panels_context(*, device_id: uuid.UUID, time_range: TimeRange) -> dict[str, Any]:
    """The template context of a device page's panels (`admin/analytics/device_panels.html`)."""
    telemetry = device_telemetry(device_id=device_id, time_range=time_range)
    metrics = [
        {
            "metric": series.metric,
            "latest_value": series.latest_value,
            "latest_at": series.latest_at,
            "buckets": len(series.buckets),
            "points": sum(bucket.count for bucket in series.buckets),
            "low": min((bucket.value for bucket in series.buckets), default=None),
            "high": max((bucket.value for bucket in series.buckets), default=None),
            "chart": charts.line_chart(
                name=f"metric:{series.metric}",
                points=[
                    charts.SeriesPoint(at=bucket.start, value=bucket.value, count=bucket.count)
                    for bucket in series.buckets
                ],
                start=telemetry.start,
                end=telemetry.end,
                bucket_seconds=telemetry.bucket_seconds,
                label=f"{series.metric}, average per {_duration(telemetry.bucket_seconds)}, last {time_range.label}",
            ),
        }
        for series in telemetry.metrics
    ]
    return {
        "device_id": device_id,
        "time_range": time_range,
        "time_ranges": list(TIME_RANGES.values()),
        "bucket_label": _duration(telemetry.bucket_seconds),
        "metrics": metrics,
        "alerts": device_alerts(device_id=device_id),
        "updates": device_update_history(device_id=device_id),
    }


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return "hour" if seconds == 3600 else f"{seconds // 3600} hours"
    if seconds % 60 == 0:
        return "minute" if seconds == 60 else f"{seconds // 60} minutes"
    return f"{seconds} s"
