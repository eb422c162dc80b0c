from django.urls import path

from telemetry.api.views import (
    TelemetryBatchView,
    TelemetryLatestView,
    TelemetryPointView,
    TelemetryQueryView,
    TelemetrySeriesView,
)

urlpatterns = [
    path("telemetry/point", TelemetryPointView.as_view(), name="telemetry-point"),
    path("telemetry/batch", TelemetryBatchView.as_view(), name="telemetry-batch"),
    # Metric names may contain "/", hence <path:>; "latest" and "series" are matched from the end.
    path("telemetry/<str:device_id>/<path:metric>/latest", TelemetryLatestView.as_view(), name="telemetry-latest"),
    path("telemetry/<str:device_id>/<path:metric>/series", TelemetrySeriesView.as_view(), name="telemetry-series"),
    path("telemetry/<str:device_id>", TelemetryQueryView.as_view(), name="telemetry-query"),
]
