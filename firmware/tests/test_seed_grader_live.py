"""The seed's task-3 grader tests ("Firmware Update Saga Compensation"), ported to the live platform.

The seed registers a release with a bogus checksum (`sha256-<8 hex>`) and no artifact, so every
update to it must fail and compensate; the grader looks 0.5 s after the POST (0.3 s between
forced updates). The port keeps its requests and timings and asserts more than it does: where
the grader only checks the device *if* the update had failed by then, these tests require that
it had, within the seed's time, and measure how long it took. (The `time.sleep(0.3)` between
forced updates is the seed client's pacing, part of the scenario, not a wait for a result.)
"""

import time
import uuid
from datetime import UTC, datetime

import pytest

from firmware.testing import platform_ready
from iot.testing.processes import wait_until

pytestmark = pytest.mark.live

FINAL = ("failed", "rolled_back", "installed")
# The grader reads the outcome 0.5 s after the POST; we require it well inside that.
SEED_DEADLINE_SECONDS = 0.5


@pytest.fixture(scope="module", autouse=True)
def _warm_platform(api):
    """The grader talks to a running service: wait until a worker is up (readiness), and let one update run
    through it (the first task of a fresh worker pays for its imports and connections), before timing."""
    platform_ready(api)
    device = api.post(
        "/devices",
        json={"serial_number": f"SN-WARM-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1.0.0"},
    ).json()
    version = f"warm-{uuid.uuid4().hex[:8]}"
    assert api.post("/firmware/register", json={"version": version, "checksum": "sha256-0"}).status_code == 201
    update, _ = start_update(api, device["id"], version)
    wait_until(
        lambda: api.get(f"/firmware/updates/{update['id']}").json()["status"] in FINAL,
        timeout=60,
        interval=0.05,
        message="the warm-up update",
    )


@pytest.fixture
def device_id(api, unique_id):
    response = api.post(
        "/devices",
        json={"serial_number": f"SN-{unique_id}", "device_type": "sensor", "firmware_version": "1.0.0"},
        headers={"idempotency-key": f"reg-{unique_id}"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def firmware_version(api, unique_id):
    version = f"2.0.{unique_id[:4]}-{uuid.uuid4().hex[:6]}"
    response = api.post(
        "/firmware/register",
        json={
            "version": version,
            "size_bytes": 1024000,
            "checksum": f"sha256-{unique_id}",
            "release_notes": "Test version",
            "min_compatible_version": "1.0.0",
            "created_at": datetime.now(UTC).replace(tzinfo=None).isoformat(),
        },
    )
    assert response.status_code == 201, response.text
    return version


def start_update(api, device_id: str, version: str, **body) -> tuple[dict, float]:
    started = time.monotonic()
    response = api.post("/firmware/updates", json={"device_id": device_id, "to_version": version, **body})
    assert response.status_code == 201, response.text
    return response.json(), started


def final_within_seed_deadline(api, update_id: str, started: float) -> dict:
    """The update's final state, reached within SEED_DEADLINE_SECONDS of the POST; prints how long it took."""

    def final():
        update = api.get(f"/firmware/updates/{update_id}").json()
        return update if update["status"] in FINAL else None

    update = wait_until(
        final, timeout=SEED_DEADLINE_SECONDS - (time.monotonic() - started), interval=0.01, message="a final status"
    )
    print(f"\nupdate {update['status']} {1000 * (time.monotonic() - started):.0f} ms after its POST")
    return update


def test_failed_update_restores_device_status(api, device_id, firmware_version):
    initial_status = api.get(f"/devices/{device_id}").json()["status"]
    update, started = start_update(api, device_id, firmware_version)
    update = final_within_seed_deadline(api, update["id"], started)
    assert update["status"] == "failed"
    device = api.get(f"/devices/{device_id}").json()
    assert device["status"] == initial_status and device["status"] in ("active", "registered")


def test_failed_update_preserves_firmware_version(api, device_id, firmware_version):
    original_version = api.get(f"/devices/{device_id}").json()["firmware_version"]
    update, started = start_update(api, device_id, firmware_version)
    final_within_seed_deadline(api, update["id"], started)
    assert api.get(f"/devices/{device_id}").json()["firmware_version"] == original_version


def test_update_status_reflects_failure(api, device_id, firmware_version):
    update, started = start_update(api, device_id, firmware_version)
    update = final_within_seed_deadline(api, update["id"], started)
    assert update["status"] == "failed"
    assert "checksum" in update["error"] or "no artifact" in update["error"]
    assert update["completed_at"] is not None


def test_compensation_cleans_up_partial_state(api, device_id, firmware_version):
    update, started = start_update(api, device_id, firmware_version)
    final_within_seed_deadline(api, update["id"], started)
    device = api.get(f"/devices/{device_id}").json()
    assert device["status"] != "maintenance"
    assert device["firmware_version"] != firmware_version
    pending = api.get(f"/firmware/updates?device_id={device_id}&active=true").json()["results"]
    assert pending == []


def test_multiple_failed_updates_handled_correctly(api, device_id, firmware_version):
    original_version = api.get(f"/devices/{device_id}").json()["firmware_version"]
    ids = []
    for _ in range(3):
        update, _ = start_update(api, device_id, firmware_version, force=True)
        ids.append(update["id"])
        time.sleep(0.3)  # the seed client's pacing
    final_device = api.get(f"/devices/{device_id}").json()
    assert final_device["firmware_version"] == original_version
    assert final_device["status"] in ("active", "registered")
    statuses = [api.get(f"/firmware/updates/{update_id}").json()["status"] for update_id in ids]
    assert all(status in ("failed", "rolled_back") for status in statuses), statuses


def test_saga_compensation_executes_in_reverse_order(api, device_id, firmware_version):
    update, started = start_update(api, device_id, firmware_version)
    final_within_seed_deadline(api, update["id"], started)
    update = api.get(f"/firmware/updates/{update['id']}").json()
    assert update["status"] == "failed"
    # The artifact is verified first: the device was never put in maintenance, so nothing needed undoing.
    assert [(step["name"], step["phase"], step["status"]) for step in update["saga"]["steps"]] == [
        ("verify_artifact", "forward", "failed")
    ]
    assert api.get(f"/devices/{device_id}").json()["status"] != "maintenance"


def test_device_remains_usable_after_failed_update(api, device_id, firmware_version):
    update, started = start_update(api, device_id, firmware_version)
    final_within_seed_deadline(api, update["id"], started)
    telemetry_response = api.post(
        "/telemetry/point",
        json={
            "device_id": device_id,
            "timestamp": datetime.now(UTC).isoformat(),
            "metric": "temperature",
            "value": 25.0,
        },
    )
    assert telemetry_response.status_code == 202
