"""ASGI entry point and composition root: HTTP through the pooled WSGI bridge, WebSockets through Channels.

See `iot.asgi_bridge` for why HTTP is not served by Django's ASGI handler.

Like `iot.urls` (HTTP routes), this module assembles the domain apps: it is where
their WebSocket routes are listed. The rest of the shared package `iot` imports
no app; the import-linter contracts in pyproject.toml hold both to that.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iot.settings")
django_wsgi_app = get_wsgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import StaticFilesHandler  # noqa: E402

from alerts.routing import websocket_urlpatterns as alerts_websocket_urlpatterns  # noqa: E402
from iot.asgi_bridge import pooled_http_application  # noqa: E402
from iot.health import redis_policy_warn  # noqa: E402
from iot.websocket import WebSocketAuthMiddleware  # noqa: E402
from telemetry.routing import websocket_urlpatterns as telemetry_websocket_urlpatterns  # noqa: E402

websocket_urlpatterns = [*telemetry_websocket_urlpatterns, *alerts_websocket_urlpatterns]

application = ProtocolTypeRouter(
    {
        "http": pooled_http_application(StaticFilesHandler(django_wsgi_app)),
        "websocket": WebSocketAuthMiddleware(URLRouter(websocket_urlpatterns)),
    }
)

# Loud in the log of every web process if Redis may evict keys (see iot.health).
redis_policy_warn(process=f"web {os.getpid()}")
