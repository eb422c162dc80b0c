"""Aggregated series of one metric of one device, for charts: buckets computed by Postgres.

A chart of a week of per-minute data needs 168 hourly values, not 10 080 points: the
buckets are made by the query (`date_bin` over `telemetry_point`, GROUP BY), so what
leaves Postgres and the web process is one row per bucket, never the raw points.

Buckets:

* are `interval_seconds` long and aligned to the Unix epoch (1970-01-01T00:00:00Z, the
  `date_bin` origin): a bucket starts at a multiple of the interval since then, so the
  same interval always gives the same bucket edges whatever the range asked for (hourly
  buckets start on the hour, daily ones at 00:00 UTC);
* cover the points with `start_time <= ts < end_time` only: the first and last bucket may
  hold only the part of their interval inside the range;
* with no point are left out (a chart draws a gap, or the client fills it);
* are at most TELEMETRY_SERIES_MAX_BUCKETS per answer (aligned buckets touching the range,
  empty or not): more is a 400 on `interval` whose message names the limit and the smallest
  interval that fits.

The query reads the index `(device_id, metric, ts DESC)` for the range (only the day
partitions it overlaps). A reading, not a write: these are selectors of the telemetry app,
in a module of their own with the interval syntax and bucket arithmetic they need.
"""

import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from django.conf import settings
from django.db import DataError, connection
from django.utils import timezone

from iot.errors import ServiceError
from telemetry.models import TABLE

ORIGIN = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_RANGE = timedelta(hours=24)

# `interval`: a whole number of seconds, or of minutes, hours or days with a suffix: 90, 90s, 5m, 1h, 1d.
INTERVAL_PATTERN = r"[1-9][0-9]{0,8}[smhd]?"
_INTERVAL = re.compile(INTERVAL_PATTERN)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Longer buckets than this are not a chart of telemetry kept TELEMETRY_RETENTION_SECONDS (30 days by
# default); the bound also keeps every timestamp arithmetic far from overflowing.
MAX_INTERVAL_SECONDS = 366 * 86400

# The aggregate of each bucket; `count` is the number of points (also in every bucket's `count`).
AGGREGATES = {
    "avg": "avg(value)",
    "min": "min(value)",
    "max": "max(value)",
    "sum": "sum(value)",
    "count": "count(*)",
}

_SERIES_SQL = f"""
SELECT date_bin(%(stride)s, ts, %(origin)s) AS bucket, {{aggregate}}, count(*)
FROM {TABLE}
WHERE device_id = %(device_id)s AND metric = %(metric)s AND ts >= %(start)s AND ts < %(end)s
GROUP BY bucket
ORDER BY bucket
"""


def interval_seconds_parse(text: str) -> int:
    """`90`, `90s`, `5m`, `1h`, `1d` -> seconds; ValueError (saying what is accepted) for anything else."""
    if not _INTERVAL.fullmatch(text):
        raise ValueError(
            "Must be a whole number of seconds, or of minutes, hours or days with a suffix: 90, 90s, 5m, 1h, 1d."
        )
    seconds = int(text.rstrip("smhd")) * _UNIT_SECONDS[text[-1] if text[-1].isalpha() else ""]
    if seconds > MAX_INTERVAL_SECONDS:
        raise ValueError(f"Must be at most 366d ({MAX_INTERVAL_SECONDS} seconds).")
    return seconds


def _bucket_index(moment: datetime, interval_us: int) -> int:
    return ((moment - ORIGIN) // timedelta(microseconds=1)) // interval_us  # exact integers, floor for the past


def series_bucket_count(*, start_time: datetime, end_time: datetime, interval_seconds: int) -> int:
    """How many epoch-aligned buckets touch [start_time, end_time) (start < end)."""
    interval_us = interval_seconds * 1_000_000
    last = _bucket_index(end_time - timedelta(microseconds=1), interval_us)
    return last - _bucket_index(start_time, interval_us) + 1


# Bounds the search for the smallest fitting interval (below): past it, the answer is an interval that
# surely fits, at most R/(M-1) - R/M seconds above the smallest (R the range, M the limit), which is
# under a second for any range up to M(M-1) seconds (46 days at M = 2000) and reached only for ranges
# of centuries at that M.
_SEARCH_STEPS = 10_000


def series_min_interval_seconds(*, start_time: datetime, end_time: datetime, max_buckets: int) -> int | None:
    """The smallest whole-second interval whose buckets over the range number at most `max_buckets`,
    or None if even MAX_INTERVAL_SECONDS gives more (the range is too long)."""
    range_us = (end_time - start_time) // timedelta(microseconds=1)
    # count >= range/interval, so nothing shorter than range/max fits; and count <= ceil(range/interval) + 1,
    # so range/(max - 1) always does.
    lowest = max(1, math.ceil(range_us / (max_buckets * 1_000_000)))
    surely = math.ceil(range_us / ((max_buckets - 1) * 1_000_000)) if max_buckets > 1 else MAX_INTERVAL_SECONDS
    for seconds in range(lowest, min(surely, lowest + _SEARCH_STEPS, MAX_INTERVAL_SECONDS) + 1):
        if series_bucket_count(start_time=start_time, end_time=end_time, interval_seconds=seconds) <= max_buckets:
            return seconds
    fits = min(surely, MAX_INTERVAL_SECONDS)
    if series_bucket_count(start_time=start_time, end_time=end_time, interval_seconds=fits) <= max_buckets:
        return fits
    return None


class TelemetrySeriesInvalid(ServiceError):
    """A range the series cannot be computed for (400, on the field at fault)."""

    status_code = 400

    def __init__(self, detail: str, *, field: str) -> None:
        self.field = field
        super().__init__(detail)


class TelemetrySeriesTooManyBuckets(ServiceError):
    """More buckets than TELEMETRY_SERIES_MAX_BUCKETS (400 on `interval`, the shape of every 400: the
    message names the number needed, the limit, and the smallest interval that fits)."""

    status_code = 400
    field = "interval"


class TelemetrySeriesOverflow(ServiceError):
    """A bucket's sum (or the sum behind its average) is beyond a 64-bit float (422 on `agg`)."""

    status_code = 422
    field = "agg"
    default_detail = (
        "The sum of a bucket's values is beyond the range of a 64-bit float (values near ±1.8e308): "
        "use min, max or count, or shorter buckets."
    )


@dataclass(frozen=True)
class SeriesBucket:
    start: datetime
    value: float
    count: int


@dataclass(frozen=True)
class Series:
    device_id: uuid.UUID
    metric: str
    agg: str
    interval_seconds: int
    start_time: datetime
    end_time: datetime
    buckets: list[SeriesBucket]


def telemetry_series(
    *,
    device_id: uuid.UUID,
    metric: str,
    agg: str,
    interval_seconds: int,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
) -> Series:
    """The non-empty buckets of `metric` of the device over [start_time, end_time), oldest first.

    `end_time` defaults to now, `start_time` to 24 hours before `end_time`. Raises
    `TelemetrySeriesInvalid` for an empty or reversed range, `TelemetrySeriesTooManyBuckets` past
    TELEMETRY_SERIES_MAX_BUCKETS (checked before any query), `TelemetrySeriesOverflow` when a sum
    leaves float8. `agg` is a key of AGGREGATES (validated by the caller; anything else: KeyError).
    """
    aggregate = AGGREGATES[agg]
    if end_time is None:
        end_time = timezone.now()
    if start_time is None:
        try:
            start_time = end_time - DEFAULT_RANGE
        except OverflowError as exc:  # an end_time in the first day of year 1
            raise TelemetrySeriesInvalid("Too early for the default range; send start_time.", field="end_time") from exc
    if start_time >= end_time:
        raise TelemetrySeriesInvalid("Must be after start_time.", field="end_time")
    max_buckets = settings.TELEMETRY_SERIES_MAX_BUCKETS
    buckets = series_bucket_count(start_time=start_time, end_time=end_time, interval_seconds=interval_seconds)
    if buckets > max_buckets:
        smallest = series_min_interval_seconds(start_time=start_time, end_time=end_time, max_buckets=max_buckets)
        hint = (
            f"an interval of at least {smallest} seconds fits"
            if smallest is not None
            else f"no interval up to 366d fits: shorten the range to at most {(max_buckets - 1) * 366} days"
        )
        raise TelemetrySeriesTooManyBuckets(
            f"The range needs {buckets} buckets of {interval_seconds} s; at most {max_buckets} "
            f"(TELEMETRY_SERIES_MAX_BUCKETS) are answered: {hint}."
        )
    params = {
        "stride": timedelta(seconds=interval_seconds),
        "origin": ORIGIN,
        "device_id": device_id,
        "metric": metric,
        "start": start_time,
        "end": end_time,
    }
    try:
        with connection.cursor() as cursor:
            cursor.execute(_SERIES_SQL.format(aggregate=aggregate), params)
            rows = cursor.fetchall()
    except DataError as exc:
        if isinstance(exc.__cause__, psycopg.errors.NumericValueOutOfRange):
            raise TelemetrySeriesOverflow() from exc
        raise
    return Series(
        device_id=device_id,
        metric=metric,
        agg=agg,
        interval_seconds=interval_seconds,
        start_time=start_time,
        end_time=end_time,
        buckets=[SeriesBucket(start=start, value=float(value), count=count) for start, value, count in rows],
    )
