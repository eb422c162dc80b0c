"""Request bodies for the telemetry API, as the devices send them.

Plain dicts built from the API's documented shape; nothing here imports the telemetry app (`iot/` imports
no domain app). What a test reads back from Postgres is in `telemetry/testing.py`.

A point is identified by (device, metric, timestamp): one sent again is answered 202 but not stored
twice. So the timestamps these helpers make up are never repeated within the process for the same
device and metric (moved on by a microsecond if needed): two bodies built in the same microsecond, or
two batches whose millisecond grids happen to line up, would otherwise make a test that counts stored
points flaky. A timestamp given explicitly is used as it is (a test of duplicates gives its own).
"""

import threading
from datetime import UTC, datetime, timedelta

_issued: set[tuple[str, str, datetime]] = set()
_issued_lock = threading.Lock()


def now_iso(offset_seconds: float = 0.0) -> str:
    """What the seed clients send: a naive UTC ISO timestamp (`datetime.utcnow().isoformat()`)."""
    return (datetime.now(UTC) + timedelta(seconds=offset_seconds)).replace(tzinfo=None).isoformat()


def unique_iso(device_id: str, metric: str, offset_seconds: float = 0.0) -> str:
    """`now_iso(offset_seconds)`, moved on a microsecond at a time past any this process made for the device
    and metric."""
    moment = (datetime.now(UTC) + timedelta(seconds=offset_seconds)).replace(tzinfo=None)
    key = str(device_id).lower()
    with _issued_lock:
        while (key, metric, moment) in _issued:
            moment += timedelta(microseconds=1)
        _issued.add((key, metric, moment))
    return moment.isoformat()


def point_body(
    device_id: str, *, metric: str = "temperature", value: float = 25.0, timestamp: str | None = None
) -> dict:
    """One point for `POST /telemetry/point`, stamped now (uniquely, see above) unless `timestamp` is given."""
    return {
        "device_id": device_id,
        "timestamp": timestamp or unique_iso(device_id, metric),
        "metric": metric,
        "value": value,
    }


def batch_body(device_id: str, size: int, *, metric: str = "temperature", start_offset: float = -60.0) -> dict:
    """`size` points with distinct timestamps (one millisecond apart, each unique, see above) and values
    0..size-1."""
    return {
        "device_id": device_id,
        "points": [
            {
                "device_id": device_id,
                "timestamp": unique_iso(device_id, metric, start_offset + i / 1000),
                "metric": metric,
                "value": float(i),
            }
            for i in range(size)
        ],
    }
