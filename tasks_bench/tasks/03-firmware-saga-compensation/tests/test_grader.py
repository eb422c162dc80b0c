"""Grader for task 03 (firmware update saga compensation), over HTTP against the live platform.

The seed's grader registered a release with a bogus checksum, so every update failed at its first
step, before anything needed undoing, and it only looked at the device if the update had failed
within 0.5 s. Here the release has a real artifact, so the update gets past verification: the device
is put in maintenance and the update offered to it. Then it fails where a real one does (the device
reports a failure, goes silent) or is cancelled, and the graders require, within a deadline, that the
update ended `failed` (or `rolled_back`) and that everything the saga did was undone, in reverse order:
the offer withdrawn, the device back in its status with its firmware version.
"""

import hashlib
import os
import uuid
from datetime import UTC, datetime

import pytest

from iot.testing.processes import wait_until

pytestmark = pytest.mark.live

FINAL = ("failed", "rolled_back", "installed")
DEADLINE = 60.0
# How long after its update ended a device may take to be given back its state (the platform settles the
# device in the transaction that records the outcome, so this is slack for the reads, not for the work).
SETTLE = 10.0


@pytest.fixture
def device(api) -> dict:
    response = api.post(
        "/devices",
        json={"serial_number": f"SN-FW-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1.0.0"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["firmware_version"]) == ("registered", "1.0.0")
    return body


@pytest.fixture
def release(api) -> str:
    """A release whose artifact is uploaded and matches its checksum: updates to it pass verification."""
    content = os.urandom(32 * 1024)
    version = f"2.0.{uuid.uuid4().hex[:12]}"
    checksum = f"sha256-{hashlib.sha256(content).hexdigest()}"
    body = {"version": version, "checksum": checksum, "size_bytes": len(content)}
    response = api.post("/firmware/register", json=body)
    assert response.status_code == 201, response.text
    response = api.put(f"/firmware/versions/{version}/artifact", files={"file": ("image.bin", content)})
    assert response.status_code == 201, response.text
    return version


def device_headers(device: dict) -> dict:
    return {"Authorization": f"Device {device['device_token']}"}


def start(api, device: dict, version: str, **body) -> dict:
    response = api.post("/firmware/updates", json={"device_id": device["id"], "to_version": version, **body})
    assert response.status_code == 201, response.text
    return response.json()


def offered(api, device: dict, update_id: str) -> None:
    """Wait until the update is offered to the device (it is in maintenance by then)."""

    def on_offer():
        response = api.get("/firmware/device/update", headers=device_headers(device))
        assert response.status_code in (200, 204), response.text
        return response.status_code == 200 and response.json()["update_id"] == update_id

    wait_until(on_offer, timeout=DEADLINE, interval=0.1, message="the update to be offered to the device")
    assert state(api, device) == ("maintenance", "1.0.0")


def report(api, device: dict, update_id: str, status: str, **fields) -> None:
    response = api.post(
        f"/firmware/updates/{update_id}/report", json={"status": status, **fields}, headers=device_headers(device)
    )
    assert response.status_code == 200, response.text


def final(api, update_id: str) -> dict:
    def ended():
        update = api.get(f"/firmware/updates/{update_id}").json()
        return update if update["status"] in FINAL else None

    return wait_until(ended, timeout=DEADLINE, interval=0.1, message=f"update {update_id} to end")


def state(api, device: dict) -> tuple[str, str]:
    response = api.get(f"/devices/{device['id']}")
    assert response.status_code == 200, response.text
    return response.json()["status"], response.json()["firmware_version"]


def restored(api, device: dict) -> None:
    """Once its update has ended, the device is as it was before the update and nothing is offered to it."""
    wait_until(
        lambda: state(api, device) == ("registered", "1.0.0"),
        timeout=SETTLE,
        interval=0.1,
        message="the device's status and firmware version to be restored",
    )
    response = api.get("/firmware/device/update", headers=device_headers(device))
    assert response.status_code == 204, response.text


def test_failed_update_restores_device_status_and_version(api, device, release):
    update = start(api, device, release)
    offered(api, device, update["id"])
    report(api, device, update["id"], "failed", reason="flash write error")
    assert final(api, update["id"])["status"] == "failed"
    restored(api, device)


def test_update_status_reflects_failure(api, device, release):
    update = start(api, device, release)
    offered(api, device, update["id"])
    report(api, device, update["id"], "failed", reason="flash write error")
    update = final(api, update["id"])
    assert update["status"] == "failed"
    assert update["error"] and update["completed_at"]


def test_compensation_undoes_the_completed_steps_in_reverse_order(api, device, release):
    update = start(api, device, release)
    offered(api, device, update["id"])
    report(api, device, update["id"], "failed", reason="flash write error")
    final(api, update["id"])
    restored(api, device)

    def compensations():
        steps = api.get(f"/firmware/updates/{update['id']}").json()["saga"]["steps"]
        undone = [(step["name"], step["status"]) for step in steps if step["phase"] == "compensate"]
        return undone if undone and all(status == "done" for _, status in undone) else None

    undone = wait_until(compensations, timeout=SETTLE, interval=0.1, message="the compensations to be done")
    # Offered last, withdrawn first; put in maintenance first, given back last.
    assert [name for name, _ in undone] == ["dispatch", "enter_maintenance"]


def test_silent_device_update_fails_and_is_compensated(api, device, release):
    update = start(api, device, release)
    offered(api, device, update["id"])
    # The device never reports: after its timeout the update fails, and is undone like any failure.
    assert final(api, update["id"])["status"] == "failed"
    restored(api, device)


def test_cancelled_update_is_rolled_back(api, device, release):
    update = start(api, device, release)
    offered(api, device, update["id"])
    response = api.post(f"/firmware/updates/{update['id']}/cancel", json={"reason": "wrong release"})
    assert response.status_code == 200, response.text
    assert final(api, update["id"])["status"] == "rolled_back"
    restored(api, device)


def test_multiple_failed_updates_handled_correctly(api, device, release):
    for attempt in range(3):
        update = start(api, device, release)
        offered(api, device, update["id"])
        report(api, device, update["id"], "failed", reason=f"attempt {attempt}")
        assert final(api, update["id"])["status"] == "failed"
        restored(api, device)
    assert state(api, device) == ("registered", "1.0.0")


def test_successful_update_installs_the_version_and_gives_the_status_back(api, device, release):
    update = start(api, device, release)
    offered(api, device, update["id"])
    report(api, device, update["id"], "installed", version=release)
    assert final(api, update["id"])["status"] == "installed"
    wait_until(
        lambda: state(api, device) == ("registered", release),
        timeout=SETTLE,
        interval=0.1,
        message="the device to run the new version, in its previous status",
    )


def test_checksum_mismatch_fails_before_touching_the_device(api, device):
    """The seed's own scenario: a release whose checksum names no artifact fails verification at once."""
    version = f"2.0.{uuid.uuid4().hex[:12]}"
    response = api.post("/firmware/register", json={"version": version, "checksum": f"sha256-{uuid.uuid4().hex[:8]}"})
    assert response.status_code == 201, response.text
    update = start(api, device, version)
    assert final(api, update["id"])["status"] == "failed"
    assert state(api, device) == ("registered", "1.0.0")


def test_device_remains_usable_after_failed_update(api, device, release):
    update = start(api, device, release)
    offered(api, device, update["id"])
    report(api, device, update["id"], "failed", reason="flash write error")
    final(api, update["id"])
    restored(api, device)
    now = datetime.now(UTC).isoformat()
    point = {"device_id": device["id"], "timestamp": now, "metric": "temperature", "value": 25}
    assert api.post("/telemetry/point", json=point).status_code == 202
    # ... and it can be updated again.
    update = start(api, device, release)
    offered(api, device, update["id"])
