"""A firmware rollout to a simulated fleet on the live platform (web x2 + worker running the update saga).

20 devices, seed 5: exactly 4 fail their install and 2 go silent after `downloading`; the platform
times silent devices out after FIRMWARE_DEVICE_TIMEOUT_SECONDS (4 s here) and fails their update.
"""

import hashlib
import os
import time
from datetime import UTC, datetime

import pytest

from iot.simulator.device import FAIL, INSTALL, INSTALL_FAILURE_REASON, INSTALLED, SILENT, WENT_SILENT
from iot.simulator.device import FAILED as DEVICE_FAILED
from iot.simulator.fleet import FleetSimulator
from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.processes import http_client, wait_until

pytestmark = pytest.mark.live

DEVICES = 20
# A short lease: a step task lost on a loaded machine (a publish that failed after commit) is queued again
# by the sweeper within seconds, not the production minute.
ENV = {
    **UNLIMITED,
    "FIRMWARE_DEVICE_TIMEOUT_SECONDS": "4",
    "SAGA_SWEEP_INTERVAL_SECONDS": "1",
    "SAGA_LEASE_SECONDS": "5",
}
ENDED = ("installed", "failed", "rolled_back")


def publish_release(client, *, version: str, content: bytes) -> None:
    """Register a release with the contract's fields, then upload its artifact."""
    response = client.post(
        "/firmware/register",
        json={
            "version": version,
            "size_bytes": len(content),
            "checksum": f"sha256:{hashlib.sha256(content).hexdigest()}",
            "release_notes": "simulated rollout",
            "min_compatible_version": "1.0.0",
            "created_at": datetime.now(UTC).isoformat(),
        },
    )
    assert response.status_code == 201, response.text
    response = client.put(f"/firmware/versions/{version}/artifact", files={"file": ("image.bin", content)})
    assert response.status_code == 201, response.text


def _where(update: dict) -> dict:
    """An unfinished update, shortly: its status, the device's report and where its saga is."""
    saga = update.get("saga") or {}
    return {
        "status": update.get("status"),
        "device_report": update.get("device_report"),
        "saga": {key: saga.get(key) for key in ("status", "current_step", "error")},
        "steps": [(s["name"], s["phase"], s["status"], s["attempts"], s["error"]) for s in saga.get("steps", [])],
    }


def test_rollout_ends_installed_failed_and_silent_per_the_plan(
    django_db_blocker, platform_logs, operator_token, unique_id
):
    with dedicated_platform(django_db_blocker, platform_logs, name="sim-ota", env=ENV) as running:
        with http_client(running, operator_token) as api:
            version = f"2.0.{unique_id}"
            publish_release(api, version=version, content=os.urandom(200_000))
            fleet = FleetSimulator(
                base_url=running.base_url,
                operator_token=operator_token,
                devices=DEVICES,
                groups=2,
                prefix=f"SIMO-{unique_id}",
                interval=2.0,
                failure_rate=0.2,
                silence_rate=0.1,
                ota_poll_interval=0.5,
                seed=5,
            )
            fleet.register()
            plans = {plan.serial_number: plan.ota_plan for plan in fleet.plan}
            assert sorted(plans.values()).count(FAIL) == 4 and list(plans.values()).count(SILENT) == 2

            update_of: dict[str, str] = {}
            for device in fleet.devices:
                response = api.post("/firmware/updates", json={"device_id": device.identity.id, "to_version": version})
                assert response.status_code in (201, 202), response.text
                update_of[device.identity.serial_number] = response.json()["id"]

            started = time.monotonic()
            assert fleet.run_until(lambda stats: stats.updates_ended >= DEVICES, timeout=120), (
                fleet.stats().summary_line()
            )
            rollout_seconds = time.monotonic() - started
            stats = fleet.stats()
            assert (stats.updates_installed, stats.updates_failed, stats.updates_silent) == (14, 4, 2)
            assert stats.updates_abandoned == 0 and stats.crashed == 0 and stats.auth_failed == 0
            expected_outcome = {INSTALL: INSTALLED, FAIL: DEVICE_FAILED, SILENT: WENT_SILENT}
            for device in stats.per_device:
                update_id = update_of[device.serial_number]
                assert device.updates == {update_id: expected_outcome[device.ota_plan]}, device
                assert device.firmware_version == (version if device.ota_plan == INSTALL else "1.0.0")

            # The platform's side: every update ends (silent ones by the device timeout), the devices'
            # firmware follows the outcome.
            deadline = time.monotonic() + 120  # a loaded CI machine: the sagas are Celery tasks on 2 cores
            pending = dict(update_of)
            final: dict[str, dict] = {}
            while pending and time.monotonic() < deadline:
                for serial, update_id in list(pending.items()):
                    body = api.get(f"/firmware/updates/{update_id}").json()
                    if body["status"] in ENDED:
                        final[serial] = body
                        del pending[serial]
                time.sleep(0.5)
            assert not pending, {
                serial: _where(api.get(f"/firmware/updates/{u}").json()) for serial, u in pending.items()
            }
            for device in stats.per_device:
                body = final[device.serial_number]
                # The list reads Postgres: the session platform (same database, another Redis prefix) may have
                # run this update's compensation, and its cache tombstone went to its own prefix, not ours.
                listed = api.get("/devices", params={"serial_number": device.serial_number}).json()["results"]
                (server_device,) = listed
                if device.ota_plan == INSTALL:
                    assert body["status"] == "installed", body
                    assert server_device["firmware_version"] == version
                else:
                    assert body["status"] == "failed", body
                    assert server_device["firmware_version"] == "1.0.0"
                    assert server_device["status"] != "maintenance"
                if device.ota_plan == FAIL:
                    assert INSTALL_FAILURE_REASON in (body["error"] or ""), body
            print(f"rollout of {DEVICES} devices: device side done in {rollout_seconds:.1f}s")


def test_device_waits_for_install_allowed_and_drops_a_withdrawn_update(api, platform, operator_token, unique_id):
    """Updates with a maintenance window an hour ahead: the devices download and wait; cancelled, they drop them."""
    version = f"3.0.{unique_id}"
    publish_release(api, version=version, content=os.urandom(50_000))
    fleet = FleetSimulator(
        base_url=platform.base_url,
        operator_token=operator_token,
        devices=3,
        prefix=f"SIMW-{unique_id}",
        interval=5.0,
        ota_poll_interval=0.3,
        seed=1,
    )
    fleet.register()
    window = {"start": datetime.fromtimestamp(time.time() + 3600, UTC).isoformat(), "duration_seconds": 600}
    update_ids = []
    for device in fleet.devices:
        response = api.post(
            "/firmware/updates",
            json={"device_id": device.identity.id, "to_version": version, "maintenance_window": window},
        )
        assert response.status_code in (201, 202), response.text
        update_ids.append(response.json()["id"])

    def all_waiting() -> bool:
        return all(device.update is not None and device.update.phase == "await_install" for device in fleet.devices)

    with fleet.running():
        wait_until(all_waiting, timeout=60, message="devices downloaded and waiting")
        for update_id in update_ids:
            body = api.get(f"/firmware/updates/{update_id}").json()
            assert body["status"] == "downloaded" and body["install_allowed"] is False, body
        for update_id in update_ids:
            response = api.post(f"/firmware/updates/{update_id}/cancel", json={"reason": "test"})
            assert response.status_code == 200, response.text
        wait_until(lambda: fleet.stats().updates_abandoned == 3, timeout=60, message="updates dropped")
    stats = fleet.stats()
    assert stats.updates_installed == 0 and all(device.firmware_version == "1.0.0" for device in stats.per_device)
    assert all(
        reason == "the platform stopped offering the update"
        for device in stats.per_device
        for reason in device.update_reasons.values()
    )
