"""The lean ingestion validator (no database, no server)."""

import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from rest_framework.exceptions import ValidationError

from telemetry.api.validation import (
    TelemetryOutOfWindow,
    parse_timestamp,
    parse_value,
    validate_batch,
    validate_point,
)

DEVICE = str(uuid.uuid4())


def recent(seconds_ago: float = 1.0) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.250000", datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)),
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01 12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_parse_to_aware_utc(raw, expected):
    parsed = parse_timestamp(raw)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize("raw", ["", "now", "2024-02-30T00:00:00", 1714564800, None, ["2024-05-01"], "9" * 65])
def test_bad_timestamps_are_refused(raw):
    assert parse_timestamp(raw) is None


@pytest.mark.parametrize(("raw", "expected"), [(1, 1.0), (-2.5, -2.5), (0, 0.0), (10**300, 1e300)])
def test_numbers_become_floats(raw, expected):
    assert parse_value(raw) == expected


@pytest.mark.parametrize("raw", [True, False, "1.0", None, math.nan, math.inf, -math.inf, 10**400, [1], {}])
def test_non_numbers_and_non_finite_values_are_refused(raw):
    assert parse_value(raw) is None


def test_valid_point_becomes_a_one_point_batch():
    batch = validate_point({"device_id": DEVICE, "timestamp": recent(), "metric": "temp", "value": 3})
    assert str(batch.device_id) == DEVICE
    assert batch.metrics == ["temp"] and batch.values == [3.0] and len(batch) == 1


def test_point_errors_name_every_bad_field():
    with pytest.raises(ValidationError) as error:
        validate_point({"device_id": "x", "timestamp": "y", "metric": "", "value": "z", "extra": 1})
    assert set(error.value.detail) == {"device_id", "timestamp", "metric", "value", "extra"}


def test_window_errors_are_a_separate_422():
    future = (datetime.now(UTC) + timedelta(minutes=6)).isoformat()
    with pytest.raises(TelemetryOutOfWindow) as error:
        validate_point({"device_id": DEVICE, "timestamp": future, "metric": "t", "value": 1})
    assert error.value.status_code == 422
    assert "ahead of the server clock" in str(error.value.detail["timestamp"][0])
    # Within the allowed clock skew:
    near = (datetime.now(UTC) + timedelta(minutes=4)).isoformat()
    assert len(validate_point({"device_id": DEVICE, "timestamp": near, "metric": "t", "value": 1})) == 1


def test_batch_is_column_wise_and_keeps_order():
    points = [{"timestamp": recent(i), "metric": f"m{i % 2}", "value": i} for i in range(5)]
    batch = validate_batch({"device_id": DEVICE, "points": points})
    assert batch.metrics == ["m0", "m1", "m0", "m1", "m0"]
    assert batch.values == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert batch.timestamps == sorted(batch.timestamps, reverse=True)


def test_a_bad_metric_after_good_ones_is_still_caught():
    points = [{"timestamp": recent(), "metric": "ok", "value": 1}] * 3 + [
        {"timestamp": recent(), "metric": "not ok", "value": 1}
    ]
    with pytest.raises(ValidationError) as error:
        validate_batch({"device_id": DEVICE, "points": points})
    assert list(error.value.detail) == ["points[3].metric"]


def test_batch_device_id_may_be_repeated_in_any_uuid_spelling():
    points = [
        {"device_id": DEVICE.upper(), "timestamp": recent(), "metric": "m", "value": 1},
        {"device_id": DEVICE, "timestamp": recent(), "metric": "m", "value": 1},
        {"timestamp": recent(), "metric": "m", "value": 1},
    ]
    assert len(validate_batch({"device_id": DEVICE, "points": points})) == 3
    points[0]["device_id"] = str(uuid.uuid4())
    with pytest.raises(ValidationError) as error:
        validate_batch({"device_id": DEVICE, "points": points})
    assert list(error.value.detail) == ["points[0].device_id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "non_field_errors"),
        ({"device_id": DEVICE}, "points"),
        ({"device_id": DEVICE, "points": []}, "points"),
        ({"device_id": DEVICE, "points": [1, 2]}, "points[0]"),
        ({"points": [{"timestamp": "2024-01-01", "metric": "m", "value": 1}]}, "device_id"),
    ],
)
def test_batch_shape_errors(body, field):
    with pytest.raises(ValidationError) as error:
        validate_batch(body)
    assert field in error.value.detail


def test_batch_cap_is_checked_before_looking_at_points(settings):
    settings.TELEMETRY_BATCH_MAX_POINTS = 3
    with pytest.raises(ValidationError) as error:
        validate_batch({"device_id": DEVICE, "points": [None] * 4})
    assert error.value.detail == {"points": ["At most 3 points per batch, got 4; split it."]}


@pytest.mark.parametrize("metric", [{"name": "t"}, ["t"], [], {}, None, 1.5, True])
def test_a_batch_metric_of_any_json_type_is_a_400_not_a_crash(metric):
    """Objects and lists are unhashable: looking them up among the good names raised TypeError (a 500)."""
    points = [
        {"timestamp": recent(), "metric": "ok", "value": 1},
        {"timestamp": recent(), "metric": metric, "value": 1},
    ]
    with pytest.raises(ValidationError) as error:
        validate_batch({"device_id": DEVICE, "points": points})
    assert list(error.value.detail) == ["points[1].metric"]


@pytest.mark.parametrize(
    "raw",
    [
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59.999999-23:59",
        "2024-05-01T12:00:00\x00",
        "2024-05-01T12:00:00Z\x00",
        "2024-05-01\x00",
    ],
)
def test_timestamps_outside_utc_years_or_with_nul_are_refused(raw):
    assert parse_timestamp(raw) is None
    with pytest.raises(ValidationError) as error:
        validate_point({"device_id": DEVICE, "timestamp": raw, "metric": "t", "value": 1})
    assert list(error.value.detail) == ["timestamp"]
