"""WebSocket routes of the telemetry app (included by `iot.websocket`)."""

from django.urls import path

from telemetry.consumers import TelemetryLiveConsumer

websocket_urlpatterns = [
    path("ws/telemetry/<str:device_id>", TelemetryLiveConsumer.as_asgi()),
]
