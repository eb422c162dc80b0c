"""One JSON error shape for every failure, and no 500 for a dependency outage.

DRF's handler covers its own exceptions; on top of that, Django's 404/permission
errors become JSON, a service's refusal (`iot.errors.ServiceError`) becomes the
status, body and headers it carries, and an unreachable Postgres or Redis becomes
`503` with `Retry-After` instead of an opaque `500`.
"""

import logging

import redis
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

from iot.errors import ServiceError

logger = logging.getLogger(__name__)

# Redis full under `noeviction` (OutOfMemoryError) or a replica not yet promoted after a failover
# (ReadOnlyError) is an outage to wait out, like a refused connection.
DEPENDENCY_ERRORS = (
    OperationalError,
    InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)


def api_exception_handler(exc, context):
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    if isinstance(exc, ServiceError):
        # Like DRF's own refusals: a surrounding ATOMIC_REQUESTS transaction is rolled back.
        set_rollback()
        return Response(exc.body(), status=exc.status_code, headers=exc.headers)
    response = exception_handler(exc, context)
    if response is not None:
        return response
    if isinstance(exc, DEPENDENCY_ERRORS):
        logger.warning("dependency unavailable: %s", exc)
        return Response(
            {"detail": "A backing service is temporarily unavailable; retry shortly."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, DatabaseError):
        logger.exception("database error")
    return None


def json_not_found(request, exception=None):
    return JsonResponse({"detail": "Not found."}, status=404)


def json_server_error(request):
    return JsonResponse({"detail": "Internal server error."}, status=500)


def json_bad_request(request, exception=None):
    return JsonResponse({"detail": "Bad request."}, status=400)


def json_permission_denied(request, exception=None):
    return JsonResponse({"detail": "You do not have permission to perform this action."}, status=403)
