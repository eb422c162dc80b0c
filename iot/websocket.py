"""WebSocket routing and authentication (Channels).

Clients authenticate like the HTTP API: `Authorization: Token <key>` /
`Device <token>` headers, or `?token=<key>` for browsers that cannot set
headers. `scope["principal"]` is the operator user or the device principal.
"""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware

from telemetry.routing import websocket_urlpatterns as telemetry_websocket_urlpatterns

websocket_urlpatterns: list = [*telemetry_websocket_urlpatterns]


@database_sync_to_async
def _principal_for(scheme: str, credential: str):
    if scheme == "Token":
        from rest_framework.authtoken.models import Token

        token = Token.objects.select_related("user").filter(key=credential).first()
        return token.user if token and token.user.is_active else None
    if scheme == "Device":
        from devices.authentication import DevicePrincipal
        from devices.selectors import device_get_by_token_hash
        from devices.services import device_token_hash

        device = device_get_by_token_hash(token_hash=device_token_hash(credential))
        if device is None or device.status == "decommissioned":
            return None
        return DevicePrincipal(device_id=device.pk, serial_number=device.serial_number)
    return None


class WebSocketAuthMiddleware(BaseMiddleware):
    async def __call__(self, scope, receive, send):
        scheme, credential = "", ""
        headers = dict(scope.get("headers", []))
        if b"authorization" in headers:
            parts = headers[b"authorization"].decode(errors="replace").split()
            if len(parts) == 2:
                scheme, credential = parts
        else:
            token = parse_qs(scope.get("query_string", b"").decode()).get("token")
            if token:
                scheme, credential = "Token", token[0]
        scope["principal"] = await _principal_for(scheme, credential) if credential else None
        return await super().__call__(scope, receive, send)
