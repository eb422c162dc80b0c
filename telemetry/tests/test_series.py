"""GET /telemetry/{device_id}/{metric}/series in process (Django's test client): aggregates, bucket edges,
the bucket limit, bad input, who may read."""

import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from devices.models import DeviceStatus
from devices.services import device_update
from devices.testing import device_create
from iot.testing.factories import operator_token_create
from telemetry import series
from telemetry.testing import points_insert

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)  # on the hour


def at(hours: float = 0, *, minutes: float = 0, seconds: float = 0, microseconds: int = 0) -> datetime:
    return T0 + timedelta(hours=hours, minutes=minutes, seconds=seconds, microseconds=microseconds)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
def operator(client):
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {operator_token_create().key}"
    return client


@pytest.fixture
def device():
    return device_create(serial_prefix="SERIES").device


@pytest.fixture
def history(device):
    """Hourly buckets from T0: [1, 2, 6] | [-4] | (none) | [10], plus points the series must not count."""
    points_insert(
        device_id=device.pk,
        metric="temp",
        points=[
            (at(0), 1.0),  # on the bucket's first instant
            (at(minutes=30), 2.0),
            (at(1, microseconds=-1), 6.0),  # the last instant of the first hour
            (at(1), -4.0),  # the first instant of the next: the next bucket
            (at(3, minutes=15), 10.0),
            (at(4), 99.0),  # at end_time (exclusive)
            (at(microseconds=-1), 99.0),  # just before start_time
        ],
    )
    points_insert(device_id=device.pk, metric="humidity", points=[(at(minutes=10), 50.0)])
    points_insert(device_id=uuid.uuid4(), metric="temp", points=[(at(minutes=10), 500.0)])
    return device


def smallest_named(message: str) -> int:
    """The smallest fitting interval a too-many-buckets refusal names."""
    match = re.search(r"an interval of at least (\d+) seconds fits", message)
    assert match, message
    return int(match.group(1))


def get_series(client, device_id, metric="temp", **params):
    return client.get(f"/telemetry/{device_id}/{metric}/series", params)


@pytest.mark.parametrize(
    ("agg", "values"),
    [
        ("avg", [3.0, -4.0, 10.0]),
        ("min", [1.0, -4.0, 10.0]),
        ("max", [6.0, -4.0, 10.0]),
        ("sum", [9.0, -4.0, 10.0]),
        ("count", [3.0, 1.0, 1.0]),
    ],
)
def test_each_aggregate_of_the_points_inserted(operator, history, agg, values):
    answer = get_series(operator, history.pk, start_time=iso(at(0)), end_time=iso(at(4)), interval="1h", agg=agg)
    assert answer.status_code == 200, answer.content
    assert answer.json() == {
        "device_id": str(history.pk),
        "metric": "temp",
        "agg": agg,
        "interval_seconds": 3600,
        "start_time": iso(at(0)),
        "end_time": iso(at(4)),
        # the empty 12:00 bucket is left out; the points at end_time and before start_time are not counted
        "buckets": [
            {"start": iso(at(0)), "value": values[0], "count": 3},
            {"start": iso(at(1)), "value": values[1], "count": 1},
            {"start": iso(at(3)), "value": values[2], "count": 1},
        ],
    }


def test_buckets_are_aligned_to_the_epoch_whatever_the_range(operator, history):
    # A range starting mid-bucket: the first bucket still starts on the hour, holding only the points in range.
    answer = get_series(operator, history.pk, start_time=iso(at(minutes=30)), end_time=iso(at(2)), interval="3600")
    assert [(b["start"], b["value"], b["count"]) for b in answer.json()["buckets"]] == [
        (iso(at(0)), 4.0, 2),
        (iso(at(1)), -4.0, 1),
    ]
    # 7-minute buckets start at multiples of 420 s since 1970-01-01T00:00:00Z.
    answer = get_series(operator, history.pk, start_time=iso(at(0)), end_time=iso(at(4)), interval="7m", agg="count")
    starts = [datetime.fromisoformat(b["start"]) for b in answer.json()["buckets"]]
    assert starts and all(int(start.timestamp()) % 420 == 0 for start in starts)
    assert sum(b["count"] for b in answer.json()["buckets"]) == 5
    # Daily buckets start at 00:00 UTC; times with an offset are read as the instant they name.
    answer = get_series(
        operator,
        history.pk,
        start_time="2026-11-20T00:00:00+02:00",
        end_time="2026-11-21T00:00:00+02:00",
        interval="1d",
    )
    assert answer.json()["start_time"] == "2026-11-19T22:00:00Z"
    assert [(b["start"], b["count"]) for b in answer.json()["buckets"]] == [("2026-11-20T00:00:00Z", 7)]


def test_the_default_range_is_the_last_24_hours(operator, device):
    now = timezone.now()
    points_insert(
        device_id=device.pk, metric="temp", points=[(now - timedelta(hours=1), 1.0), (now - timedelta(hours=25), 2.0)]
    )
    body = get_series(operator, device.pk, interval="1h").json()
    end = datetime.fromisoformat(body["end_time"])
    assert abs(end - now) < timedelta(seconds=30)
    assert datetime.fromisoformat(body["start_time"]) == end - timedelta(hours=24)
    assert [b["value"] for b in body["buckets"]] == [1.0]
    # With end_time alone, the 24 hours before it.
    body = get_series(operator, device.pk, interval="1h", end_time=iso(now - timedelta(hours=24))).json()
    assert [b["value"] for b in body["buckets"]] == [2.0]


def test_a_week_of_minutes_charts_as_168_hourly_buckets(operator, device):
    start = datetime(2026, 11, 16, tzinfo=UTC)
    points_insert(
        device_id=device.pk,
        metric="load",
        points=[(start + timedelta(minutes=m), float(m % 60)) for m in range(10_080)],
    )
    params = {"start_time": iso(start), "end_time": iso(start + timedelta(days=7))}
    began = time.perf_counter()
    answer = get_series(operator, device.pk, "load", interval="1h", **params)
    elapsed_ms = (time.perf_counter() - began) * 1000
    buckets = answer.json()["buckets"]
    assert len(buckets) == 168 and {(b["value"], b["count"]) for b in buckets} == {(29.5, 60)}
    print(
        f"\nseries of a week of minutes, 1h buckets: {elapsed_ms:.1f} ms (first request; bench/series.py for medians)"
    )
    # Per minute it is 10 080 buckets, past the limit: the answer names the smallest interval that fits.
    refused = get_series(operator, device.pk, "load", interval="1m", **params)
    assert refused.status_code == 400
    (message,) = refused.json()["interval"]
    assert "needs 10080 buckets of 60 s; at most 2000 (TELEMETRY_SERIES_MAX_BUCKETS)" in message
    smallest = smallest_named(message)
    fitting = get_series(operator, device.pk, "load", interval=str(smallest), **params)
    assert fitting.status_code == 200 and 0 < len(fitting.json()["buckets"]) <= 2000
    assert sum(b["count"] for b in fitting.json()["buckets"]) == 10_080
    assert get_series(operator, device.pk, "load", interval=str(smallest - 1), **params).status_code == 400


@pytest.mark.parametrize(("start_minute", "fits"), [(0, True), (30, False)])
def test_the_bucket_limit_counts_aligned_buckets(operator, device, settings, start_minute, fits):
    """Ten hours are 10 hourly buckets from on the hour, but 11 from half past."""
    settings.TELEMETRY_SERIES_MAX_BUCKETS = 10
    start = at(minutes=start_minute)
    answer = get_series(
        operator, device.pk, start_time=iso(start), end_time=iso(start + timedelta(hours=10)), interval="1h"
    )
    if fits:
        assert answer.status_code == 200, answer.content
        return
    assert answer.status_code == 400
    (message,) = answer.json()["interval"]
    assert "needs 11 buckets of 3600 s; at most 10 (TELEMETRY_SERIES_MAX_BUCKETS)" in message
    smallest = smallest_named(message)
    assert smallest > 3600
    params = {"start_time": iso(start), "end_time": iso(start + timedelta(hours=10))}
    assert get_series(operator, device.pk, interval=str(smallest), **params).status_code == 200
    assert get_series(operator, device.pk, interval=str(smallest - 1), **params).status_code == 400


def test_the_smallest_interval_is_the_smallest():
    """Against a brute-force count of the bucket indexes of every second of a few ranges."""
    for start, seconds, limit in [(at(0), 3 * 3600, 7), (at(minutes=7, seconds=3), 5000, 13), (at(seconds=1), 999, 2)]:
        end = start + timedelta(seconds=seconds)

        def buckets(interval: int, start=start, seconds=seconds) -> int:
            first = int(start.timestamp())
            return len({(first + s) // interval for s in range(seconds)})

        smallest = series.series_min_interval_seconds(start_time=start, end_time=end, max_buckets=limit)
        assert buckets(smallest) <= limit, (start, seconds, limit)
        assert all(buckets(interval) > limit for interval in range(1, smallest)), (start, seconds, limit)
    too_long = series.series_min_interval_seconds(start_time=at(0), end_time=at(24 * 366 * 30), max_buckets=10)
    assert too_long is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"agg": "median"}, "agg"),
        ({"interval": None}, "interval"),
        ({"interval": ""}, "interval"),
        ({"interval": "0"}, "interval"),
        ({"interval": "05m"}, "interval"),
        ({"interval": "-1"}, "interval"),
        ({"interval": "1.5h"}, "interval"),
        ({"interval": "1 h"}, "interval"),
        ({"interval": "1w"}, "interval"),
        ({"interval": "1h\n"}, "interval"),
        ({"interval": "367d"}, "interval"),
        ({"interval": "999999999d"}, "interval"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"end_time": "2026-13-01T00:00:00Z"}, "end_time"),
        ({"start_time": iso(at(2)), "end_time": iso(at(1))}, "end_time"),
        ({"start_time": iso(at(1)), "end_time": iso(at(1))}, "end_time"),
        ({"end_time": "0001-01-01T05:00:00Z"}, "end_time"),
        ({"start_time": "0001-01-01T00:00:00+01:00", "end_time": iso(at(0))}, "start_time"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(operator, device, params, field):
    query = {"interval": "1h", "start_time": iso(at(0)), "end_time": iso(at(4)), **params}
    answer = get_series(operator, device.pk, **{name: value for name, value in query.items() if value is not None})
    assert answer.status_code == 400, answer.content
    assert field in answer.json(), answer.json()


def test_a_range_too_long_for_any_interval(operator, device):
    answer = get_series(
        operator, device.pk, start_time="0001-01-01T00:00:00Z", end_time="9999-12-31T00:00:00Z", interval="1d"
    )
    assert answer.status_code == 400
    (message,) = answer.json()["interval"]
    assert "no interval up to 366d fits: shorten the range to at most 731634 days" in message
    # The extreme instants themselves are fine when the buckets fit.
    assert (
        get_series(
            operator, device.pk, start_time="0001-01-01T00:00:00Z", end_time="0001-01-02T00:00:00Z", interval="1h"
        ).status_code
        == 200
    )


def test_unknown_device_and_malformed_names_are_404(operator, history):
    assert get_series(operator, uuid.uuid4(), interval="1h").status_code == 404
    assert get_series(operator, "not-a-uuid", interval="1h").status_code == 404
    assert get_series(operator, history.pk, "bad metric", interval="1h").status_code == 404
    # A metric with no points in the range: no buckets.
    answer = get_series(operator, history.pk, "pressure", interval="1h", start_time=iso(at(0)), end_time=iso(at(4)))
    assert answer.status_code == 200 and answer.json()["buckets"] == []
    # A metric name with "/" (routed like /latest).
    points_insert(device_id=history.pk, metric="cpu/load", points=[(at(0), 0.5)])
    answer = get_series(operator, history.pk, "cpu/load", interval="1h", start_time=iso(at(0)), end_time=iso(at(1)))
    assert answer.json()["metric"] == "cpu/load" and answer.json()["buckets"][0]["value"] == 0.5


def test_a_device_reads_only_its_own_series(client, history):
    assert get_series(client, history.pk, interval="1h").status_code == 401
    other = device_create(serial_prefix="SERIES-OTHER")
    client.defaults["HTTP_AUTHORIZATION"] = f"Device {other.device_token}"
    forbidden = get_series(client, history.pk, interval="1h", start_time=iso(at(0)), end_time=iso(at(4)))
    assert forbidden.status_code == 403 and "buckets" not in forbidden.json()
    assert get_series(client, uuid.uuid4(), interval="1h").status_code == 403  # no probing for ids either
    assert get_series(client, other.device.pk, interval="1h").status_code == 200
    own = device_create(serial_prefix="SERIES-OWN")
    points_insert(device_id=own.device.pk, metric="temp", points=[(at(0), 7.0)])
    client.defaults["HTTP_AUTHORIZATION"] = f"Device {own.device_token}"
    answer = get_series(client, own.device.pk, interval="1h", start_time=iso(at(0)), end_time=iso(at(1)))
    assert answer.status_code == 200 and answer.json()["buckets"] == [{"start": iso(at(0)), "value": 7.0, "count": 1}]
    device_update(device_id=own.device.pk, changes={"status": DeviceStatus.DECOMMISSIONED})
    assert get_series(client, own.device.pk, interval="1h").status_code == 401


def test_a_sum_beyond_float8_is_a_422_not_a_500(device):
    points_insert(device_id=device.pk, metric="huge", points=[(at(0), 1e308), (at(minutes=1), 1e308)])
    query = {"device_id": device.pk, "metric": "huge", "interval_seconds": 3600, "start_time": at(0), "end_time": at(1)}
    for agg in ("sum", "avg"):
        with pytest.raises(series.TelemetrySeriesOverflow), transaction.atomic():
            series.telemetry_series(agg=agg, **query)
    assert series.telemetry_series(agg="max", **query).buckets[0].value == 1e308


@pytest.mark.django_db(transaction=True)
def test_a_sum_beyond_float8_over_http(operator, device):
    points_insert(device_id=device.pk, metric="huge", points=[(at(0), 1e308), (at(minutes=1), 1e308)])
    answer = get_series(
        operator, device.pk, "huge", interval="1h", agg="sum", start_time=iso(at(0)), end_time=iso(at(1))
    )
    assert answer.status_code == 422 and "64-bit float" in answer.json()["agg"][0], answer.content
    answer = get_series(
        operator, device.pk, "huge", interval="1h", agg="max", start_time=iso(at(0)), end_time=iso(at(1))
    )
    assert answer.status_code == 200 and answer.json()["buckets"][0]["value"] == 1e308


def test_the_schema_documents_the_interval_syntax_and_the_origin(operator):
    schema = operator.get("/api/schema", HTTP_ACCEPT="application/json").json()
    operation = schema["paths"]["/telemetry/{device_id}/{metric}/series"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["interval"]["required"] and parameters["interval"]["schema"]["pattern"].startswith("^[1-9]")
    assert "Unix epoch" in parameters["interval"]["description"]
    assert parameters["agg"]["schema"]["enum"] == ["avg", "min", "max", "sum", "count"]
    assert "left out" in operation["description"]
    assert set(operation["responses"]) >= {"200", "400", "401", "403", "404", "422"}
