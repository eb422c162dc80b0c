"""WebSocket routes of the alerts app (listed in `iot.asgi`, the composition root)."""

from django.urls import path

from alerts.consumers import AlertsFeedConsumer

websocket_urlpatterns = [
    path("ws/alerts", AlertsFeedConsumer.as_asgi()),
]
