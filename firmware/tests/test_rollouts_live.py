"""Staged rollouts on the live platform (web x2 + a Celery worker with beat), played by simulated devices
(`iot.simulator.FleetSimulator`) over HTTP: a rollout that stops at its error threshold and leaves no device in
maintenance, a happy one through every stage, and pause / resume / cancel with updates in flight."""

import re
import time

import httpx
import pytest

from firmware.testing import artifact_bytes, release_publish
from iot.simulator.device import FAIL, INSTALL
from iot.simulator.fleet import FleetSimulator
from iot.testing.processes import wait_until

pytestmark = pytest.mark.live

ENDED = ("installed", "failed", "rolled_back")


def simulated_fleet(platform, operator_token: str, prefix: str, *, devices: int):
    fleet = FleetSimulator(
        base_url=platform.base_url,
        operator_token=operator_token,
        devices=devices,
        prefix=prefix,
        interval=30.0,  # telemetry is not what this is about
        ota_poll_interval=0.5,
        ota_idle_poll_interval=0.5,
        seed=11,
    )
    fleet.register()
    assert len(fleet.devices) == devices
    return fleet, f"{prefix}-group-0"


def rollout_get(api: httpx.Client, rollout_id: str) -> dict:
    response = api.get(f"/firmware/rollouts/{rollout_id}")
    assert response.status_code == 200, response.text
    return response.json()


def settled(api: httpx.Client, rollout_id: str) -> dict | None:
    body = rollout_get(api, rollout_id)
    return body if body["settled_at"] is not None else None


def all_pages(api: httpx.Client, path: str) -> list[dict]:
    items, url = [], path
    while url:
        page = api.get(url).json()
        items += page["results"]
        url = page["next"]
    return items


def devices_of(api: httpx.Client, group: str, **filters) -> list[dict]:
    query = "&".join(f"{key}={value}" for key, value in {"group_id": group, "limit": 1000, **filters}.items())
    return all_pages(api, f"/devices?{query}")


def test_a_rollout_over_failing_devices_stops_at_its_error_threshold_and_leaves_none_in_maintenance(
    api, platform, operator_token, unique_id
):
    """50 devices in stages of 5, 20 and 25: stage 1's devices install, every other device fails its install. The
    rollout stops once more than 20% of its finished updates failed, while stage 2 is in flight: stage 3 is never
    handed out, stage 2's updates still in flight are rolled back, and no device stays in maintenance.

    Which devices fail is decided once stage 1's updates exist (the fleet is not running yet): the rollout orders
    its targets by a hash of its own id, so a failure plan fixed beforehand would leave the outcome to chance
    (stage 1 and 2 drawing few failures let stage 3 out, and a fast fleet then finished every update)."""
    release = release_publish(api, content=artifact_bytes(100_000))
    fleet, group = simulated_fleet(platform, operator_token, f"ROF-{unique_id}", devices=50)
    body = {
        "to_version": release["version"],
        "group_id": group,
        "stages": [10, 50, 100],
        # Low enough that a stage can always still pass: what stops this rollout is the error threshold.
        "success_threshold": 0.2,
        "error_threshold": 0.2,
    }
    response = api.post("/firmware/rollouts", json=body)
    assert response.status_code == 201, response.text
    rollout_id = response.json()["id"]
    assert response.json()["progress"]["targets"] == 50
    stage_one = wait_until(
        lambda: {u["device_id"] for u in all_pages(api, f"/firmware/updates?rollout_id={rollout_id}")} or None,
        timeout=60,
        message="stage 1's updates",
    )
    assert len(stage_one) == 5
    for device in fleet.devices:
        device.ota_plan = INSTALL if device.identity.id in stage_one else FAIL
    started = time.monotonic()
    with fleet.running():
        final = wait_until(lambda: settled(api, rollout_id), timeout=180, interval=0.5, message="the rollout settled")
    seconds = time.monotonic() - started

    assert final["status"] == "stopped", final
    reason = re.search(
        r"(\d+) of (\d+) finished updates failed \(\d+%\), past the error threshold of 20%", final["stop_reason"]
    )
    assert reason, final["stop_reason"]
    failed_then, finished_then = int(reason[1]), int(reason[2])
    assert finished_then >= 5 and failed_then / finished_then > 0.2  # (updates that raced the stop may dilute it)
    counts = final["progress"]["counts"]
    assert counts["not_started"] == 25, counts  # stage 3 was never handed out
    assert counts["installed"] <= 5 and counts["failed"] >= 1, counts
    assert sum(counts[status] for status in ("pending", "downloading", "downloaded", "installing")) == 0
    updates = all_pages(api, f"/firmware/updates?rollout_id={rollout_id}&limit=1000")
    assert len(updates) == 50 - counts["not_started"] - counts["skipped"] == 25
    assert all(update["status"] in ENDED for update in updates), [u for u in updates if u["status"] not in ENDED]
    assert {u["device_id"] for u in updates if u["status"] == "installed"} <= stage_one
    assert not devices_of(api, group, status="maintenance")
    installed = {update["device_id"] for update in updates if update["status"] == "installed"}
    for device in devices_of(api, group):
        assert device["firmware_version"] == (release["version"] if device["id"] in installed else "1.0.0"), device
    print(f"\nrollout of 50 (stages 2 and 3 failing): stopped after {seconds:.1f}s with {counts}")


def test_a_happy_rollout_goes_through_every_stage(api, platform, operator_token, unique_id):
    release = release_publish(api, content=artifact_bytes(100_000))
    fleet, group = simulated_fleet(platform, operator_token, f"ROH-{unique_id}", devices=20)
    body = {"to_version": release["version"], "group_id": group, "stages": [10, 50, 100], "success_threshold": 1.0}
    with fleet.running():
        rollout_id = api.post("/firmware/rollouts", json=body).json()["id"]
        final = wait_until(lambda: settled(api, rollout_id), timeout=180, interval=0.5, message="the rollout settled")
    assert final["status"] == "completed", final
    assert final["progress"]["counts"]["installed"] == 20 and final["progress"]["success_rate"] == 1.0
    stages = final["progress"]["per_stage"]
    assert [(stage["targets"], stage["state"], stage["counts"]["installed"]) for stage in stages] == [
        (2, "passed", 2),
        (8, "passed", 8),
        (10, "passed", 10),
    ]
    assert stages[0]["passed_at"] <= stages[1]["started_at"] and stages[1]["passed_at"] <= stages[2]["started_at"]
    assert {device["firmware_version"] for device in devices_of(api, group)} == {release["version"]}
    assert {device.firmware_version for device in fleet.devices} == {release["version"]}


def test_pause_holds_the_next_stage_resume_goes_on_and_cancel_rolls_back_in_flight(
    api, platform, operator_token, unique_id
):
    release = release_publish(api, content=artifact_bytes(100_000))
    fleet, group = simulated_fleet(platform, operator_token, f"ROP-{unique_id}", devices=20)
    body = {"to_version": release["version"], "group_id": group, "stages": [10, 100], "success_threshold": 1.0}
    rollout_id = api.post("/firmware/rollouts", json=body).json()["id"]
    # The devices are not running yet: stage 1's two updates are created and wait for them.
    wait_until(
        lambda: rollout_get(api, rollout_id)["progress"]["counts"]["pending"] == 2, timeout=60, message="stage 1"
    )
    paused = api.post(f"/firmware/rollouts/{rollout_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"

    with fleet.running():
        # Stage 1 installs and passes while paused (an advance ran and judged it), but stage 2 is held.

        def stage_1_passed() -> dict | None:
            body = rollout_get(api, rollout_id)
            return body if body["progress"]["per_stage"][0]["state"] == "passed" else None

        held = wait_until(stage_1_passed, timeout=90, interval=0.3, message="stage 1 passed")
    assert held["status"] == "paused" and held["current_stage"] == 1
    assert held["progress"]["per_stage"][1]["counts"]["not_started"] == 18
    assert held["progress"]["counts"]["installed"] == 2

    # The devices are stopped again: stage 2's updates will be in flight (devices in maintenance) until cancelled.
    resumed = api.post(f"/firmware/rollouts/{rollout_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "running"
    wait_until(
        lambda: len(devices_of(api, group, status="maintenance")) == 18,
        timeout=60,
        interval=0.3,
        message="stage 2's devices in maintenance",
    )
    cancelled = api.post(f"/firmware/rollouts/{rollout_id}/cancel", json={"reason": "test cancel"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    final = wait_until(lambda: settled(api, rollout_id), timeout=90, interval=0.3, message="the rollout settled")
    counts = final["progress"]["counts"]
    assert (counts["installed"], counts["rolled_back"], counts["not_started"]) == (2, 18, 0), counts
    assert not devices_of(api, group, status="maintenance")
    versions = sorted(device["firmware_version"] for device in devices_of(api, group))
    assert versions == ["1.0.0"] * 18 + [release["version"]] * 2
    rolled_back = all_pages(api, f"/firmware/updates?rollout_id={rollout_id}&status=rolled_back&limit=1000")
    assert len(rolled_back) == 18 and all(update["error"] == "rollout cancelled: test cancel" for update in rolled_back)
    assert api.post(f"/firmware/rollouts/{rollout_id}/resume").status_code == 409
