"""`X-MQTT-Auth-Secret: <MQTT_AUTH_SECRET>`: the broker, asking about a client (`/mqtt/auth`, `/mqtt/acl`).

These endpoints answer whether a device token is valid, so they are for the broker alone: it sends
the shared secret in a header of its own (EMQX 5: the authenticator's and authorizer's `headers`;
the embedded broker: `mqtt.broker`). Compared in constant time. With `MQTT_AUTH_SECRET` unset the
endpoints refuse every caller: nothing can ask about a device token.
"""

import hmac
from dataclasses import dataclass

from django.conf import settings
from rest_framework import authentication, exceptions
from rest_framework.permissions import BasePermission

HEADER = "X-MQTT-Auth-Secret"
_META_KEY = "HTTP_" + HEADER.upper().replace("-", "_")


@dataclass(frozen=True)
class BrokerPrincipal:
    """`request.user` for a call made by the MQTT broker."""

    is_broker: bool = True
    is_device: bool = False
    is_authenticated: bool = True
    is_active: bool = True
    is_staff: bool = False
    is_superuser: bool = False
    pk = None

    def __str__(self) -> str:
        return "mqtt broker"


class BrokerSecretAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        sent = request.META.get(_META_KEY)
        if sent is None:
            return None
        expected = settings.MQTT_AUTH_SECRET
        if not expected:
            raise exceptions.AuthenticationFailed("MQTT_AUTH_SECRET is not set on this server: no broker may ask.")
        if not hmac.compare_digest(sent.encode(errors="surrogateescape"), expected.encode()):
            raise exceptions.AuthenticationFailed(f"Wrong {HEADER}.")
        return BrokerPrincipal(), None

    def authenticate_header(self, request) -> str:
        # Makes a missing secret a 401 (DRF answers 403 when no authenticator names a scheme).
        return HEADER


class IsBroker(BasePermission):
    message = f"Only the MQTT broker may call this endpoint (send {HEADER})."

    def has_permission(self, request, view) -> bool:
        if getattr(request.user, "is_broker", False):
            return True
        if request.user is None or not request.user.is_authenticated:
            raise exceptions.NotAuthenticated(f"Send the broker's shared secret in {HEADER}.")
        return False
