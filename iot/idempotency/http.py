"""DRF glue: wrap a view's write in `Idempotency-Key` semantics."""

from collections.abc import Callable
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from iot.idempotency.services import idempotent_execute, request_fingerprint

HEADER = "Idempotency-Key"


def _principal(request: Request) -> str:
    user = request.user
    device_id = getattr(user, "device_id", None)
    if device_id is not None:
        return f"device:{device_id}"
    return f"user:{getattr(user, 'pk', 'anonymous')}"


def idempotent_response(request: Request, handler: Callable[[], tuple[int, Any]]) -> Response:
    """Run `handler` (returning status and body) once per key; replay it for repeats.

    Without the header, `handler` simply runs. Replays carry `Idempotent-Replayed: true`.
    """
    key = request.headers.get(HEADER)
    if key is None:
        status, body = handler()
        return Response(body, status=status)
    key = key.strip()
    if not key or len(key) > settings.IDEMPOTENCY_KEY_MAX_LENGTH or not key.isprintable():
        raise ValidationError({HEADER: [f"Must be 1 to {settings.IDEMPOTENCY_KEY_MAX_LENGTH} printable characters."]})
    # Its refusals (`IdempotencyError`: 409 in flight or unreadable, 422 reused with another
    # body) carry their answers to `iot.api.exceptions.api_exception_handler`.
    outcome = idempotent_execute(
        scope=f"{_principal(request)}:{request.method}:{request.path}",
        key=key,
        fingerprint=request_fingerprint(payload=request.data),
        handler=handler,
    )
    response = Response(outcome.body, status=outcome.status)
    if outcome.replayed:
        response["Idempotent-Replayed"] = "true"
    return response
