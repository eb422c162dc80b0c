"""Telemetry HTTP API: ingestion (point, batch) and reads (query, latest).

Status codes of ingestion:

* 202 the points are committed in Postgres (`X-RateLimit-Limit/-Remaining` set);
* 400 malformed body (shape, types, non-finite value, unparsable timestamp, bad
  metric, empty/oversized batch, a point's device_id differing from the batch's);
* 401 no/invalid credentials; 403 a device sending for another device;
* 422 well-formed but unacceptable: unknown or decommissioned device, timestamp
  outside [now - retention, now + TELEMETRY_MAX_FUTURE_SECONDS], a batch with
  more points than the per-device rate limit (it could never be admitted);
* 429 rate limit used up (`Retry-After`, `X-RateLimit-Limit/-Remaining`) or the
  event queue past its warning threshold (`Retry-After`);
* 503 event queue past its critical threshold (`Retry-After`), or Postgres/Redis
  unreachable.

Nothing is stored for any answer but 202.
"""

import re
import uuid

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException, NotFound, ParseError, PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.selectors import device_get
from iot.api.permissions import IsOperatorOrDevice, is_device
from telemetry import selectors, services
from telemetry.api.parsers import StrictJSONParser
from telemetry.api.serializers import (
    AcceptedSerializer,
    BatchAcceptedSerializer,
    BatchInSerializer,
    PointInSerializer,
    TelemetryPointSerializer,
    TelemetryQuerySerializer,
)
from telemetry.api.validation import METRIC_PATTERN, TelemetryOutOfWindow, validate_batch, validate_point
from telemetry.metrics import count_points

_metric_ok = re.compile(METRIC_PATTERN).fullmatch

INGEST_RESPONSES = {
    400: OpenApiResponse(description="Malformed body; the answer maps each bad field (e.g. `points[3].value`)."),
    403: OpenApiResponse(description="A device may only send its own telemetry."),
    422: OpenApiResponse(
        description="Unknown or decommissioned device, timestamp outside the accepted window, "
        "or more points than the per-device rate limit."
    ),
    429: OpenApiResponse(description="Rate limit used up, or event queue past its warning threshold."),
    503: OpenApiResponse(description="Event queue past its critical threshold, or a backing service is down."),
}


class Unprocessable(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "unprocessable"


def _refusal(status_code: int, detail: str, headers: dict[str, str], **extra) -> Response:
    return Response({"detail": detail, **extra}, status=status_code, headers=headers)


def _rate_limit_headers(decision) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining)}


def _points_in(data) -> int:
    points = data.get("points") if isinstance(data, dict) else None
    return len(points) if isinstance(points, list) else 1


class _IngestView(APIView):
    permission_classes = [IsOperatorOrDevice]
    parser_classes = [StrictJSONParser]
    throttle_classes: list = []  # rate limiting is the service's (exact, in points)

    def validate(self, data) -> services.PointColumns:
        raise NotImplementedError

    def accepted_body(self, result: services.IngestResult) -> dict:
        raise NotImplementedError

    def post(self, request):
        try:
            batch = self.validate(request.data)
        except (ParseError, ValidationError, TelemetryOutOfWindow):
            count_points(outcome="invalid", points=_points_in(request.data))
            raise
        if is_device(request.user) and request.user.device_id != batch.device_id:
            raise PermissionDenied("A device may only send its own telemetry.")
        points = len(batch)
        try:
            result = services.telemetry_points_ingest(batch=batch)
        except services.TelemetryBackpressure as exc:
            count_points(outcome="backpressure", points=points)
            critical = exc.admission.state == "critical"
            return _refusal(
                status.HTTP_503_SERVICE_UNAVAILABLE if critical else status.HTTP_429_TOO_MANY_REQUESTS,
                "The platform is overloaded; retry later." if critical else "The platform is busy; slow down.",
                {"Retry-After": str(max(exc.admission.retry_after_seconds, 1))},
            )
        except services.TelemetryRateLimited as exc:
            count_points(outcome="rate_limited", points=points)
            decision = exc.decision
            return _refusal(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"Rate limit exceeded ({decision.scope}): at most {decision.limit} points per device per window."
                if decision.scope == "device"
                else "Global telemetry rate limit exceeded; retry in a moment.",
                {"Retry-After": str(max(decision.retry_after_seconds, 1)), **_rate_limit_headers(decision)},
                scope=decision.scope,
            )
        except services.TelemetryBatchOverLimit as exc:
            count_points(outcome="invalid", points=points)
            limit = exc.decision.limit
            raise Unprocessable(
                {"points": [f"{exc.points} points can never fit the per-device limit of {limit} per window."]}
            ) from exc
        except (services.TelemetryUnknownDevice, services.TelemetryDeviceDecommissioned) as exc:
            count_points(outcome="invalid", points=points)
            raise Unprocessable({"device_id": [str(exc)]}) from exc
        count_points(outcome="accepted", points=points)
        return Response(
            self.accepted_body(result), status=status.HTTP_202_ACCEPTED, headers=_rate_limit_headers(result.rate_limit)
        )


class TelemetryPointView(_IngestView):
    @extend_schema(
        request=PointInSerializer,
        responses={202: AcceptedSerializer, **INGEST_RESPONSES},
        description="Store one point. 202 means it is committed. See the status scheme in the module docs.",
    )
    def post(self, request):
        return super().post(request)

    def validate(self, data):
        return validate_point(data)

    def accepted_body(self, result):
        return {"status": "accepted"}


class TelemetryBatchView(_IngestView):
    @extend_schema(
        request=BatchInSerializer,
        responses={202: BatchAcceptedSerializer, **INGEST_RESPONSES},
        description="Store a batch of one device's points, all or nothing, in one statement. "
        "The rate limit counts points: a batch of n uses n.",
    )
    def post(self, request):
        return super().post(request)

    def validate(self, data):
        return validate_batch(data)

    def accepted_body(self, result):
        return {"status": "accepted", "count": result.count}


def _readable_device(request, raw_device_id: str) -> uuid.UUID:
    """The device the caller may read: 404 for a non-UUID or unknown id, 403 for another device's."""
    try:
        device_id = uuid.UUID(raw_device_id)
    except ValueError as exc:
        raise NotFound("No device with this id.") from exc
    if is_device(request.user):
        if request.user.device_id != device_id:
            raise PermissionDenied("A device may only read its own telemetry.")
        return device_id
    if device_get(device_id=device_id) is None:
        raise NotFound("No device with this id.")
    return device_id


class TelemetryQueryView(APIView):
    permission_classes = [IsOperatorOrDevice]

    @extend_schema(
        parameters=[TelemetryQuerySerializer],
        responses={200: TelemetryPointSerializer(many=True)},
        description="A device's points, newest first (limit 1-1000, default 100). Unknown device: 404.",
    )
    def get(self, request, device_id: str):
        device = _readable_device(request, device_id)
        query = TelemetryQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        points = selectors.telemetry_points_query(device_id=device, **query.validated_data)
        return Response(TelemetryPointSerializer(points, many=True).data)


class TelemetryLatestView(APIView):
    permission_classes = [IsOperatorOrDevice]

    @extend_schema(
        parameters=[OpenApiParameter("metric", str, OpenApiParameter.PATH)],
        responses={200: TelemetryPointSerializer, 404: OpenApiResponse(description="Unknown device or no point.")},
        description="The newest point of one metric of a device.",
    )
    def get(self, request, device_id: str, metric: str):
        device = _readable_device(request, device_id)
        point = selectors.telemetry_points_latest(device_id=device, metric=metric) if _metric_ok(metric) else None
        if point is None:
            raise NotFound("No telemetry for this metric of this device.")
        return Response(TelemetryPointSerializer(point).data)
