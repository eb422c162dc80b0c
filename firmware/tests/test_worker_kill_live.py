"""A Celery worker SIGKILLed while firmware sagas run: the sweeper finishes every one, and no step runs twice.

Twenty devices (simulated, `iot.simulator`) get an update each; the worker and its whole process tree
are killed while the sagas are in flight (at whatever step each one is: verifying, entering
maintenance, dispatching, waiting for feedback); a new worker is started. Every update must end
`installed` with its device on the new version and out of maintenance, and every step of every saga
must have been recorded done exactly once (a step killed mid-way rolled back with its transaction and
ran again whole).
"""

import time

import pytest

from firmware.testing import artifact_bytes, platform_ready, release_publish
from iot.simulator.fleet import FleetSimulator
from iot.testing.live import dedicated_platform
from iot.testing.processes import http_client, start_worker, wait_until

pytestmark = pytest.mark.live

DEVICES = 20
ENV = {"SAGA_SWEEP_INTERVAL_SECONDS": "0.5", "SAGA_LEASE_SECONDS": "2", "FIRMWARE_DEVICE_TIMEOUT_SECONDS": "60"}


def test_a_worker_killed_mid_saga_loses_no_update(django_db_setup, django_db_blocker, platform_logs, operator_token):
    with dedicated_platform(django_db_blocker, platform_logs, name="firmware-kill", env=ENV) as running:
        with http_client(running, operator_token) as api:
            platform_ready(api)
            release = release_publish(api, content=artifact_bytes(100_000))
            fleet = FleetSimulator(
                base_url=running.base_url,
                operator_token=operator_token,
                devices=DEVICES,
                prefix="KILL",
                interval=30.0,
                ota_poll_interval=0.3,
                seed=3,
                state_path=platform_logs / "kill-fleet.json",
            )
            fleet.register()
            ours = [{"id": report.device_id} for report in fleet.stats().per_device]
            assert len(ours) == DEVICES
            with fleet.running():
                updates = []
                for device in ours:
                    response = api.post(
                        "/firmware/updates", json={"device_id": device["id"], "to_version": release["version"]}
                    )
                    assert response.status_code == 201, response.text
                    updates.append(response.json()["id"])
                worker = running.processes[1]
                assert worker.name == "worker"
                # Kill while sagas are in flight: some steps done, some not yet.
                wait_until(
                    lambda: (
                        any(api.get(f"/firmware/updates/{u}").json()["status"] != "pending" for u in updates)
                        or any(api.get(f"/firmware/updates/{u}").json()["dispatched_at"] for u in updates)
                    ),
                    timeout=30,
                    message="a saga under way",
                )
                worker.kill()
                killed = time.monotonic()
                start_worker(running, log_dir=platform_logs / "firmware-kill", name="worker-2")

                def finished():
                    return all(api.get(f"/firmware/updates/{u}").json()["status"] == "installed" for u in updates)

                wait_until(finished, timeout=120, interval=0.5, message="every update installed")
                print(
                    f"\nworker killed mid-saga: all {DEVICES} updates installed {time.monotonic() - killed:.1f} s later"
                )

            # The devices as Postgres has them: this test's platform shares the test database with the session's
            # platform, whose sweeper may run some of these sagas on its own worker and tombstone the device cache
            # under its own Redis prefix, not this platform's (one deployment has one prefix; tests have several).
            from devices.models import Device

            with django_db_blocker.unblock():
                states = set(
                    Device.objects.filter(pk__in=[d["id"] for d in ours]).values_list("firmware_version", "status")
                )
            assert {version for version, _ in states} == {release["version"]}
            assert "maintenance" not in {status for _, status in states}
            for update_id in updates:
                saga = api.get(f"/firmware/updates/{update_id}").json()["saga"]
                forward = [step for step in saga["steps"] if step["phase"] == "forward"]
                assert [step["status"] for step in forward] == ["done"] * len(forward), saga
                assert len({step["name"] for step in forward}) == len(forward), saga  # each step recorded once
