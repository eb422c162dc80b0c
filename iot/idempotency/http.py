"""DRF glue: wrap a view's write in `Idempotency-Key` semantics."""

from collections.abc import Callable
from typing import Any

from django.conf import settings
from rest_framework import status as http_status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from iot.idempotency.services import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    IdempotencyReplayUnreadable,
    idempotent_execute,
    request_fingerprint,
)

HEADER = "Idempotency-Key"


class IdempotencyConflict(APIException):
    status_code = http_status.HTTP_409_CONFLICT
    default_detail = "A request with this Idempotency-Key is still being processed; retry shortly."
    default_code = "idempotency_key_in_flight"


class IdempotencyKeyMismatch(APIException):
    status_code = http_status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "This Idempotency-Key was already used with a different request body."
    default_code = "idempotency_key_reused"


class IdempotencyReplayUnavailable(APIException):
    """The first request was done, but its stored response can't be decrypted any more.

    `409`, not `500` (nothing is broken for this caller to report) and not a re-run
    (its work is already committed; see `IdempotencyReplayUnreadable`). Retrying with
    the same key gives the same answer until the key expires.
    """

    status_code = http_status.HTTP_409_CONFLICT
    default_detail = (
        "The request with this Idempotency-Key was already processed, but its response can no longer be "
        "replayed (the server's key for stored responses was changed). It was not run again: read the "
        "resource, or send the request with a new Idempotency-Key."
    )
    default_code = "idempotency_replay_unavailable"


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
    try:
        outcome = idempotent_execute(
            scope=f"{_principal(request)}:{request.method}:{request.path}",
            key=key,
            fingerprint=request_fingerprint(payload=request.data),
            handler=handler,
        )
    except IdempotencyKeyInFlight as exc:
        raise IdempotencyConflict() from exc
    except IdempotencyKeyReused as exc:
        raise IdempotencyKeyMismatch() from exc
    except IdempotencyReplayUnreadable as exc:
        raise IdempotencyReplayUnavailable() from exc
    response = Response(outcome.body, status=outcome.status)
    if outcome.replayed:
        response["Idempotent-Replayed"] = "true"
    return response
