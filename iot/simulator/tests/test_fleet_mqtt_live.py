"""A firmware rollout to a simulated fleet over MQTT, end to end on the live platform: web x2, the worker
with its event consumers (the OTA push) and the ingest bridge, and the embedded broker authenticating
devices against the platform (`python -m mqtt.broker`; `dedicated_platform(mqtt=True)`).

10 devices, seed 5 (2 fail their install, 1 goes silent after `downloading`). The devices connect and
learn over HTTP that nothing is waiting; then the updates are created, and they hear of them only from
the push on `devices/{id}/ota`; they report on `devices/{id}/ota/status` and send telemetry on
`devices/{id}/telemetry`. The platform must end each update as the plan says and store the telemetry.
"""

import os
import time

import pytest

from iot.simulator.device import FAIL, INSTALL, INSTALLED, SILENT, WENT_SILENT
from iot.simulator.device import FAILED as DEVICE_FAILED
from iot.simulator.fleet import FleetSimulator
from iot.simulator.tests.test_fleet_live import stored_points
from iot.simulator.tests.test_fleet_ota_live import ENDED, publish_release
from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.processes import http_client, wait_until

pytestmark = pytest.mark.live

DEVICES = 10
ENV = {
    **UNLIMITED,
    "FIRMWARE_DEVICE_TIMEOUT_SECONDS": "4",
    "SAGA_SWEEP_INTERVAL_SECONDS": "1",
    "SAGA_LEASE_SECONDS": "5",
}


def bridge_subscribed(running) -> None:
    """Wait for the worker's ingest bridge to subscribe: until then the broker drops what devices publish
    (no subscriber), and this test counts every point."""
    (worker,) = [managed for managed in running.processes if managed.name == "worker"]
    wait_until(
        lambda: "subscribed to devices/" in worker.log_path.read_text(errors="replace"), timeout=60, message="bridge"
    )


def test_a_rollout_pushed_over_mqtt_ends_per_the_plan(django_db_blocker, platform_logs, operator_token, unique_id):
    with dedicated_platform(django_db_blocker, platform_logs, name="sim-mqtt", env=ENV, mqtt=True) as running:
        bridge_subscribed(running)
        with http_client(running, operator_token) as api:
            version = f"4.0.{unique_id}"
            publish_release(api, version=version, content=os.urandom(100_000))
            fleet = FleetSimulator(
                base_url=running.base_url,
                operator_token=operator_token,
                devices=DEVICES,
                prefix=f"SIMQ-{unique_id}",
                transport="mqtt",
                mqtt_url=running.mqtt_url,
                interval=1.0,
                failure_rate=0.2,
                silence_rate=0.1,
                ota_poll_interval=0.3,
                seed=5,
            )
            fleet.register()
            plans = {plan.serial_number: plan.ota_plan for plan in fleet.plan}
            assert sorted(plans.values()) == sorted([FAIL] * 2 + [SILENT] + [INSTALL] * 7)

            update_of: dict[str, str] = {}
            with fleet.running():
                # Connected, and told over HTTP that nothing is waiting: what comes next comes by push.
                wait_until(
                    lambda: all(d.stats.ota_polls >= 2 and d.stats.points_accepted for d in fleet.devices),
                    timeout=60,
                    message="every device connected, polled and sending",
                )
                started = time.monotonic()
                for device in fleet.devices:
                    response = api.post(
                        "/firmware/updates", json={"device_id": device.identity.id, "to_version": version}
                    )
                    assert response.status_code in (201, 202), response.text
                    update_of[device.identity.serial_number] = response.json()["id"]
                wait_until(
                    lambda: fleet.stats().updates_ended >= DEVICES,
                    timeout=120,
                    interval=0.2,
                    message="every device done with its update",
                )
                device_side_seconds = time.monotonic() - started
                # Points acknowledged by now, checked once each device had more acknowledged after them: not
                # the last messages before the stop, which the embedded broker may still lose (see below).
                acknowledged = {d.identity.id: d.stats.points_accepted for d in fleet.devices}
                wait_until(
                    lambda: all(d.stats.points_accepted > acknowledged[d.identity.id] for d in fleet.devices),
                    timeout=30,
                    message="one more batch from every device",
                )
            stats = fleet.stats()

            assert stats.transport == "mqtt" and stats.crashed == 0 and stats.auth_failed == 0
            assert (stats.updates_installed, stats.updates_failed, stats.updates_silent) == (7, 2, 1), stats
            assert stats.refused_async == 0, [d.transport_counters for d in stats.per_device]
            expected = {INSTALL: INSTALLED, FAIL: DEVICE_FAILED, SILENT: WENT_SILENT}
            for device in stats.per_device:
                assert device.updates == {update_of[device.serial_number]: expected[device.ota_plan]}, device
                assert device.transport_counters["offers_pushed"] >= 1, device  # it heard of it by push

            # The platform's side: the reports published over MQTT ended every update as planned (the silent
            # one by the device timeout), the points published over MQTT are stored.
            final: dict[str, dict] = {}

            def all_ended() -> bool:
                for serial, update_id in update_of.items():
                    if serial not in final:
                        body = api.get(f"/firmware/updates/{update_id}").json()
                        if body["status"] in ENDED:
                            final[serial] = body
                return len(final) == DEVICES

            wait_until(all_ended, timeout=60, interval=0.5, message="every update ended on the platform")
            for device in stats.per_device:
                want = "installed" if device.ota_plan == INSTALL else "failed"
                assert final[device.serial_number]["status"] == want, final[device.serial_number]
                server_device = api.get(f"/devices/{device.device_id}").json()
                assert server_device["firmware_version"] == (version if device.ota_plan == INSTALL else "1.0.0")

            # Every point the broker acknowledged is stored by the bridge, and no more than were sent (one
            # publish cancelled by the stop after the broker had it may be stored unseen: one sample more).
            # Not checked: that the last messages before the stop, and the goodbye (`offline`) after them,
            # arrive. amqtt 0.12.1 drops the messages a publisher's connection still has waiting for their
            # topic check (an HTTP question here) when that connection ends, although it acknowledged them.
            def stored(device_id: str) -> int:
                return len(stored_points(api, device_id))

            for device in stats.per_device:
                floor = acknowledged[device.device_id]
                assert floor > 0, device
                wait_until(lambda d=device, n=floor: stored(d.device_id) >= n, timeout=60, message="points stored")
                assert stored(device.device_id) <= device.stats.points_accepted + len(fleet.metrics), device
            print(f"\nrollout of {DEVICES} devices over MQTT: device side done in {device_side_seconds:.1f}s")
