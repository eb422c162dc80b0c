"""Telemetry HTTP API: ingestion (point, batch) and reads (query, latest, series).

Status codes of ingestion:

* 202 the points are committed in Postgres (`X-RateLimit-Limit/-Remaining` set);
* 400 malformed body (shape, types, non-finite value, unparsable timestamp, bad
  metric, empty/oversized batch, a point's device_id differing from the batch's);
* 401 no/invalid credentials; 403 a device sending for another device;
* 409 a request with the same `Idempotency-Key` is still in flight after the
  bounded wait; 422 the same key was used with another body;
* 422 well-formed but unacceptable: unknown or decommissioned device, timestamp
  outside [now - retention, now + TELEMETRY_MAX_FUTURE_SECONDS];
* 429 rate limit used up (`code: rate_limited`, `Retry-After`,
  `X-RateLimit-Limit/-Remaining`), the event queue past its warning threshold
  (`code: busy`, `Retry-After`), or a batch with more points than the device's
  whole window (`code: batch_exceeds_limit`, with `limit` and `points`, and no
  `Retry-After`: it can never be admitted, only split);
* 503 event queue past its critical threshold (`Retry-After`), or Postgres/Redis
  unreachable.

Nothing is stored for any answer but 202. With an `Idempotency-Key` (same
semantics as registration), a retried request is stored once: its retry gets the
first 202 again with `Idempotent-Replayed: true`. Refusals are not kept for
replay, so a retry after a 429/503 is tried afresh.

Without a key a retry is safe too: a point is identified by (device, metric,
timestamp), and one stored already is not stored again. The retry is answered
202 like the first request (`count` is still every point of the batch), plus
`"duplicates": k`, the points of the request that were stored before or repeat
an earlier point of it (absent when 0, so a body without duplicates is as it
always was); the stored value is the first one. It is still a new request for
the rate limit (its points are counted again: admission runs before the insert
can tell), which an `Idempotency-Key` replay is not.
"""

import re
import uuid

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, ParseError, PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.selectors import device_get
from iot.api.permissions import IsOperatorOrDevice, is_device
from iot.api.schema import BAD_QUERY, UNSUPPORTED_MEDIA, error_responses
from iot.idempotency.http import HEADER as IDEMPOTENCY_HEADER
from iot.idempotency.http import idempotent_response
from telemetry import selectors, series, services
from telemetry.api.parsers import StrictJSONParser
from telemetry.api.serializers import (
    AcceptedSerializer,
    BatchAcceptedSerializer,
    BatchInSerializer,
    PointInSerializer,
    TelemetryPointSerializer,
    TelemetryQuerySerializer,
    TelemetrySeriesQuerySerializer,
    TelemetrySeriesSerializer,
    series_to_representation,
)
from telemetry.api.validation import METRIC_PATTERN, TelemetryOutOfWindow, validate_batch, validate_point
from telemetry.metrics import count_points
from telemetry.models import METRIC_MAX_LENGTH

_metric_ok = re.compile(METRIC_PATTERN).fullmatch

INGEST_RESPONSES = error_responses(
    {
        400: "Malformed body; the answer maps each bad field (e.g. `points[3].value`).",
        403: "A device may only send its own telemetry.",
        409: "A request with the same Idempotency-Key is still in flight; retry.",
        415: UNSUPPORTED_MEDIA,
        422: "Unknown or decommissioned device, timestamp outside the accepted window, "
        "or an Idempotency-Key reused with a different body.",
        429: "`code` says which: `rate_limited` (Retry-After, X-RateLimit-*), `busy` (event queue past "
        "its warning threshold; Retry-After), or `batch_exceeds_limit`: more points than the device may send "
        "in a whole window, which can never pass (no Retry-After; `limit` and `points` in the body).",
        503: "Event queue past its critical threshold, or a backing service is down.",
    }
)

INGEST_PARAMETERS = [
    OpenApiParameter(
        IDEMPOTENCY_HEADER,
        str,
        OpenApiParameter.HEADER,
        required=False,
        description="Makes a retry safe: a request repeated with the same key and body is stored once "
        "and answered with the first 202 (`Idempotent-Replayed: true`).",
    )
]


def _points_in(data) -> int:
    points = data.get("points") if isinstance(data, dict) else None
    return len(points) if isinstance(points, list) else 1


def _claimed_device(request) -> uuid.UUID | None:
    """Whose refused submission this was: the device itself, or the body's `device_id` if it is a UUID."""
    if is_device(request.user):
        return request.user.device_id
    try:
        raw = request.data.get("device_id") if isinstance(request.data, dict) else None
        return uuid.UUID(raw) if isinstance(raw, str) and len(raw) <= 45 else None
    except (ValueError, ParseError):
        return None


def _forget_body(request) -> None:
    """Drop the parsed body DRF keeps on the request (`request.data`), once nothing reads it any more.

    DRF's Request sits in reference cycles (its `parser_context` holds the request itself; the view
    and the response hold each other), so what it holds is freed by the cyclic garbage collector
    only, and for a request that lived through a younger collection, by a full one: hundreds of
    requests later. A 1000-point body is ~420 KiB of dicts, strings and floats; held that long,
    they raised one web process's RSS from 112 to 185 MiB under 1000-point batches on 16
    connections, and a full collection then found ~50 MiB of them (`bench/web_rss.py --probe`).
    Dropped before the database round trips, a request waits holding only its `PointColumns`.
    """
    request._full_data = request._data = {}


class _IngestView(APIView):
    permission_classes = [IsOperatorOrDevice]
    parser_classes = [StrictJSONParser]
    throttle_classes: list = []  # rate limiting is the service's (exact, in points)

    def validate(self, data) -> services.PointColumns:
        raise NotImplementedError

    def accepted_body(self, result: services.IngestResult) -> dict:
        raise NotImplementedError

    def finalize_response(self, request, response, *args, **kwargs):
        _forget_body(request)  # refusals too (a 400's body is as large)
        return super().finalize_response(request, response, *args, **kwargs)

    def post(self, request):
        # Input refused here never reaches the service, so it is counted here; the service
        # counts what it decides (accepted, rate_limited, backpressure, invalid).
        try:
            batch = self.validate(request.data)
        except (ParseError, ValidationError, TelemetryOutOfWindow):
            count_points(outcome="invalid", points=_points_in(request.data))
            device_id = _claimed_device(request)
            if device_id is not None:
                services.telemetry_errors_count(device_id=device_id, points=_points_in(request.data))
            raise
        if is_device(request.user) and request.user.device_id != batch.device_id:
            raise PermissionDenied("A device may only send its own telemetry.")
        accepted: list[services.IngestResult] = []

        def ingest() -> tuple[int, dict]:
            # A refusal (`TelemetryRejected`) propagates: inside an Idempotency-Key transaction
            # the raise rolls the key back, and `api_exception_handler` gives its answer.
            _forget_body(request)  # an Idempotency-Key's fingerprint is taken: `batch` is all the rest needs
            result = services.telemetry_points_ingest(batch=batch)
            accepted.append(result)
            return status.HTTP_202_ACCEPTED, self.accepted_body(result)

        # With an `Idempotency-Key`, a retry of a stored request replays its 202 and stores
        # nothing more; only 202s are kept for replay.
        response = idempotent_response(request, ingest)
        if accepted:
            for name, value in accepted[0].headers.items():
                response[name] = value
        return response


class TelemetryPointView(_IngestView):
    @extend_schema(
        request=PointInSerializer,
        responses={202: AcceptedSerializer, **INGEST_RESPONSES},
        parameters=INGEST_PARAMETERS,
        description="Store one point. 202 means it is stored; any other answer stores nothing. A point "
        "with the device, metric and timestamp of one stored already is not stored again: 202 with "
        "`duplicates: 1` (the first value stays).",
    )
    def post(self, request):
        return super().post(request)

    def validate(self, data):
        return validate_point(data)

    def accepted_body(self, result):
        # `duplicates` only when the point was stored already: the body of a new point is unchanged.
        return {"status": "accepted", "duplicates": 1} if result.duplicates else {"status": "accepted"}


class TelemetryBatchView(_IngestView):
    @extend_schema(
        request=BatchInSerializer,
        responses={202: BatchAcceptedSerializer, **INGEST_RESPONSES},
        parameters=INGEST_PARAMETERS,
        description="Store a batch of one device's points, all or nothing (202: all stored; any other answer: none). "
        "The rate limit counts points: a batch of n uses n. Points whose device, metric and timestamp are "
        "stored already (a retry), or repeat an earlier point of the batch, are not stored again: `duplicates` "
        "says how many (absent when none); `count` is every point of the batch.",
    )
    def post(self, request):
        return super().post(request)

    def validate(self, data):
        return validate_batch(data)

    def accepted_body(self, result):
        body = {"status": "accepted", "count": result.count}
        if result.duplicates:
            body["duplicates"] = result.duplicates
        return body


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


READ_NOT_FOUND = "Unknown device (a malformed id names none either)."
DEVICE_ID = OpenApiParameter("device_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The device's id.")


class TelemetryQueryView(APIView):
    permission_classes = [IsOperatorOrDevice]

    @extend_schema(
        parameters=[DEVICE_ID, TelemetryQuerySerializer],
        responses={
            200: TelemetryPointSerializer(many=True),
            **error_responses(
                {
                    400: f"{BAD_QUERY} Or `end_time` before `start_time`.",
                    403: "A device may only read its own telemetry.",
                    404: READ_NOT_FOUND,
                }
            ),
        },
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
        parameters=[
            DEVICE_ID,
            OpenApiParameter(
                "metric",
                {"type": "string", "pattern": f"^{METRIC_PATTERN}$", "maxLength": METRIC_MAX_LENGTH},
                OpenApiParameter.PATH,
                description="A metric name; it may contain `/`.",
            ),
        ],
        responses={
            200: TelemetryPointSerializer,
            **error_responses(
                {403: "A device may only read its own telemetry.", 404: f"{READ_NOT_FOUND} Or no point of it."}
            ),
        },
        description="The newest point of one metric of a device.",
    )
    def get(self, request, device_id: str, metric: str):
        device = _readable_device(request, device_id)
        point = selectors.telemetry_points_latest(device_id=device, metric=metric) if _metric_ok(metric) else None
        if point is None:
            raise NotFound("No telemetry for this metric of this device.")
        return Response(TelemetryPointSerializer(point).data)


METRIC = OpenApiParameter(
    "metric",
    {"type": "string", "pattern": f"^{METRIC_PATTERN}$", "maxLength": METRIC_MAX_LENGTH},
    OpenApiParameter.PATH,
    description="A metric name; it may contain `/`.",
)


class TelemetrySeriesView(APIView):
    """One metric of a device as buckets of an aggregate, computed by Postgres (`telemetry/series.py`).

    Measured (`bench/series.py`: in process through Django's test client with an operator token,
    2 loaded cores, Postgres 15; medians of 100, two runs): a week of per-minute points of one
    device (10 080, among 20 devices' weeks, daily partitions), 1h buckets (168): 5.3-6.8 ms for
    the whole request, of which the query 3.4-4.1 ms (a bitmap scan of `(device_id, metric, ts DESC)`
    in each of the 8 day partitions, sort, group); 10m buckets (1008): 10.3-14.5 ms; the default
    24 hours at 1h: 2.7-3.5 ms. Raw, the same chart would be 10 080 points on the wire.
    """

    permission_classes = [IsOperatorOrDevice]

    @extend_schema(
        parameters=[DEVICE_ID, METRIC, TelemetrySeriesQuerySerializer],
        responses={
            200: TelemetrySeriesSerializer,
            **error_responses(
                {
                    400: f"{BAD_QUERY} Or `end_time` not after `start_time`; or more buckets than "
                    "TELEMETRY_SERIES_MAX_BUCKETS, on `interval`: the message names the limit and the smallest "
                    "interval that fits.",
                    403: "A device may only read its own telemetry.",
                    404: f"{READ_NOT_FOUND} Or a malformed metric name.",
                    422: "On `agg`: a bucket's sum overflows a 64-bit float (values near ±1.8e308).",
                }
            ),
        },
        description="Points of one metric of a device in [start_time, end_time) (default: the last 24 hours), "
        "as buckets of `interval` aligned to the Unix epoch, each with the aggregate `agg` of its points and "
        "their count. Buckets without points are left out; the first and last may cover only the part of "
        "their interval inside the range. At most TELEMETRY_SERIES_MAX_BUCKETS buckets (default 2000) may "
        "touch the range. A device may read its own series only.",
    )
    def get(self, request, device_id: str, metric: str):
        device = _readable_device(request, device_id)
        if not _metric_ok(metric):
            raise NotFound("No telemetry for this metric of this device (malformed metric name).")
        query = TelemetrySeriesQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        params = query.validated_data
        result = series.telemetry_series(
            device_id=device,
            metric=metric,
            agg=params["agg"],
            interval_seconds=params["interval"],
            start_time=params.get("start_time"),
            end_time=params.get("end_time"),
        )
        return Response(series_to_representation(result))
