"""WebSocket routes of the telemetry app (listed in `iot.asgi`, the composition root)."""

from django.urls import path

from telemetry.consumers import TelemetryLiveConsumer

websocket_urlpatterns = [
    path("ws/telemetry/<str:device_id>", TelemetryLiveConsumer.as_asgi()),
]
