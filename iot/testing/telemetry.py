"""Request bodies for the telemetry API, as the devices send them.

Plain dicts built from the API's documented shape; nothing here imports the telemetry app (`iot/` imports
no domain app). What a test reads back from Postgres is in `telemetry/testing.py`.
"""

from datetime import UTC, datetime, timedelta


def now_iso(offset_seconds: float = 0.0) -> str:
    """What the seed clients send: a naive UTC ISO timestamp (`datetime.utcnow().isoformat()`)."""
    return (datetime.now(UTC) + timedelta(seconds=offset_seconds)).replace(tzinfo=None).isoformat()


def point_body(
    device_id: str, *, metric: str = "temperature", value: float = 25.0, timestamp: str | None = None
) -> dict:
    """One point for `POST /telemetry/point`, stamped now unless `timestamp` is given."""
    return {"device_id": device_id, "timestamp": timestamp or now_iso(), "metric": metric, "value": value}


def batch_body(device_id: str, size: int, *, metric: str = "temperature", start_offset: float = -60.0) -> dict:
    """`size` points with distinct timestamps (one millisecond apart) and values 0..size-1."""
    return {
        "device_id": device_id,
        "points": [
            {"device_id": device_id, "timestamp": now_iso(start_offset + i / 1000), "metric": metric, "value": float(i)}
            for i in range(size)
        ],
    }
