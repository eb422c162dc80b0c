"""Firmware updates end to end on the live platform (web x2 + Celery worker), the device played over HTTP.

The device does what a real one does: polls `GET /firmware/device/update`, downloads the
artifact with its own credential and checks its SHA-256, reports its stages and its result.
Every wait is a poll with a deadline. `-s` prints the time from a device's `failed` report to
the end of the compensation (the update's final status), over several devices.
"""

import hashlib
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from firmware.testing import DeviceFirmwareClient, artifact_bytes, platform_ready, release_publish
from iot.testing.live import dedicated_platform, register_device
from iot.testing.processes import http_client, wait_until

pytestmark = pytest.mark.live

FINAL = ("installed", "failed", "rolled_back")


def device_and_client(api, **fields) -> tuple[dict, DeviceFirmwareClient]:
    device = register_device(api, "SN-FW", **fields)
    return device, DeviceFirmwareClient(client=api, device_token=device["device_token"])


def start(api, device: dict, version: str, **body) -> dict:
    response = api.post("/firmware/updates", json={"device_id": device["id"], "to_version": version, **body})
    assert response.status_code == 201, response.text
    return response.json()


def offered(device_client: DeviceFirmwareClient, *, timeout: float = 10.0) -> dict:
    """The update on offer to the device, polled until there is one."""

    def poll():
        response = device_client.pending()
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else None

    return wait_until(poll, timeout=timeout, interval=0.02, message="an update on offer")


def final(api, update_id: str, *, timeout: float = 10.0, interval: float = 0.02) -> dict:
    """The update once it has a final status, polled with a deadline (the last state seen if it never does)."""
    deadline = time.monotonic() + timeout
    while True:
        update = api.get(f"/firmware/updates/{update_id}").json()
        if update["status"] in FINAL:
            return update
        assert time.monotonic() < deadline, f"update not finished after {timeout}s: {update}"
        time.sleep(interval)


def device_state(api, device_id: str) -> tuple[str, str]:
    device = api.get(f"/devices/{device_id}").json()
    return device["status"], device["firmware_version"]


@pytest.fixture(scope="module")
def release(api) -> dict:
    platform_ready(api)
    content = artifact_bytes(300_000)
    return {**release_publish(api, content=content), "content": content}


def test_happy_path_the_device_downloads_verifies_installs(api, release):
    device, device_client = device_and_client(api)
    assert device_client.pending().status_code == 204
    update = start(api, device, release["version"])
    assert (update["status"], update["from_version"], update["to_version"]) == ("pending", "1.0.0", release["version"])
    offer = offered(device_client)
    assert offer["update_id"] == update["id"] and offer["install_allowed"] is True
    assert device_state(api, device["id"]) == ("maintenance", "1.0.0")
    download = device_client.download(offer["artifact_url"])
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == offer["sha256"] == release["artifact_sha256"]
    assert download.headers["x-checksum-sha256"] == offer["sha256"] and len(download.content) == offer["size_bytes"]
    for status, progress in (("downloading", 50), ("downloaded", 100), ("installing", 10)):
        response = device_client.report(update["id"], status, progress=progress)
        assert response.status_code == 200 and response.json()["status"] == status, response.text
    response = device_client.report(update["id"], "installed", version=release["version"])
    assert response.status_code == 200, response.text
    done = final(api, update["id"])
    assert (done["status"], done["progress"], done["error"]) == ("installed", 100, None)
    assert [step["name"] for step in done["saga"]["steps"]] == [
        "verify_artifact",
        "enter_maintenance",
        "dispatch",
        "await_feedback",
        "verify_version",
        "complete",
    ]
    assert device_state(api, device["id"]) == ("registered", release["version"])
    assert device_client.pending().status_code == 204
    # Once installed, the device's repeated report is answered with the state; another one is refused.
    assert device_client.report(update["id"], "installed", version=release["version"]).status_code == 200
    assert device_client.report(update["id"], "installing").status_code == 409


def test_a_device_failure_rolls_back_and_how_long_it_takes(api, release):
    """Ten devices fail their install; each update ends failed with the device restored. Prints the time from the
    device's `failed` report to the update's final status (compensation included), seen by a polling client and
    by the server's own clocks (the report's and the final transaction's timestamps)."""
    polled, server = [], []
    for _ in range(10):
        device, device_client = device_and_client(api, firmware_version="1.2.3")
        api.patch(f"/devices/{device['id']}", json={"status": "active"})
        update = start(api, device, release["version"])
        offered(device_client)
        assert device_client.report(update["id"], "installing", progress=40).status_code == 200
        signalled = time.monotonic()
        response = device_client.report(update["id"], "failed", reason="flash write error at 0x4000")
        assert response.status_code == 200, response.text
        done = final(api, update["id"], interval=0.005)
        polled.append(time.monotonic() - signalled)
        completed = datetime.fromisoformat(done["completed_at"])
        reported = datetime.fromisoformat(done["device_report"]["last_report_at"])
        server.append((completed - reported).total_seconds())
        assert done["status"] == "failed" and "flash write error at 0x4000" in done["error"]
        assert done["device_report"] == {
            "result": "failed",
            "version": None,
            "reason": "flash write error at 0x4000",
            "last_report_at": done["device_report"]["last_report_at"],
        }
        assert [(s["name"], s["phase"], s["status"]) for s in done["saga"]["steps"]][-3:] == [
            ("await_feedback", "forward", "failed"),
            ("dispatch", "compensate", "done"),
            ("enter_maintenance", "compensate", "done"),
        ]
        assert device_state(api, device["id"]) == ("active", "1.2.3")
        assert device_client.pending().status_code == 204
    print(
        "\nfailed report -> compensated (update final), 10 devices: "
        f"client-observed median {1000 * statistics.median(polled):.0f} ms, max {1000 * max(polled):.0f} ms; "
        f"server clocks median {1000 * statistics.median(server):.0f} ms, max {1000 * max(server):.0f} ms"
    )
    # A report that commits while await_feedback runs for the first time is read on its next run, after
    # FIRST_FEEDBACK_WAIT_SECONDS (see firmware/saga.py and firmware.services._saga_wake).
    assert max(polled) < 3.0


def test_cancel_mid_way_rolls_back(api, release):
    device, device_client = device_and_client(api, firmware_version="0.9")
    update = start(api, device, release["version"])
    offered(device_client)
    assert device_client.report(update["id"], "downloading", progress=20).status_code == 200
    cancelled = api.post(f"/firmware/updates/{update['id']}/cancel", json={"reason": "maintenance freeze"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancelled_at"] is not None
    assert device_client.report(update["id"], "downloaded").status_code == 409  # no more reports on it
    done = final(api, update["id"])
    assert (done["status"], done["error"]) == ("rolled_back", "maintenance freeze")
    assert done["saga"]["status"] == "cancelled"
    assert device_state(api, device["id"]) == ("registered", "0.9")
    assert device_client.pending().status_code == 204
    assert api.post(f"/firmware/updates/{update['id']}/cancel").status_code == 200  # again: nothing changes
    assert api.get(f"/firmware/updates/{update['id']}").json()["status"] == "rolled_back"


def test_force_supersedes_the_active_update(api, release):
    second_content = artifact_bytes(50_000)
    second_release = release_publish(api, content=second_content)
    device, device_client = device_and_client(api, firmware_version="1.0.0")
    first = start(api, device, release["version"])
    assert offered(device_client)["update_id"] == first["id"]
    refused = api.post("/firmware/updates", json={"device_id": device["id"], "to_version": second_release["version"]})
    assert refused.status_code == 409 and refused.json()["active_update_id"] == first["id"]
    second = start(api, device, second_release["version"], force=True)
    superseded = final(api, first["id"])
    assert superseded["status"] == "rolled_back" and superseded["superseded_by"] == second["id"]
    offer = offered(device_client)
    assert offer["update_id"] == second["id"] and offer["to_version"] == second_release["version"]
    # The second remembered the device's own status, not the first update's maintenance.
    assert device_client.report(first["id"], "downloading").status_code == 409
    download = device_client.download(offer["artifact_url"])
    assert hashlib.sha256(download.content).hexdigest() == hashlib.sha256(second_content).hexdigest()
    assert device_client.report(second["id"], "installed", version=second_release["version"]).status_code == 200
    assert final(api, second["id"])["status"] == "installed"
    assert device_state(api, device["id"]) == ("registered", second_release["version"])


def test_reports_are_idempotent_and_out_of_order_safe(api, release):
    device, device_client = device_and_client(api)
    update = start(api, device, release["version"])
    offered(device_client)
    assert device_client.report(update["id"], "installing", progress=30).json()["status"] == "installing"
    late = device_client.report(update["id"], "downloading", progress=90)
    assert late.status_code == 200 and (late.json()["status"], late.json()["progress"]) == ("installing", 30)
    again = device_client.report(update["id"], "installing", progress=30)
    assert again.status_code == 200 and again.json()["progress"] == 30
    for _ in range(2):
        assert device_client.report(update["id"], "failed", reason="boot loop").status_code == 200
    assert device_client.report(update["id"], "installed", version=release["version"]).status_code == 409
    assert final(api, update["id"])["status"] == "failed"
    assert device_client.report(update["id"], "failed", reason="boot loop").status_code == 200  # its own outcome
    assert device_state(api, device["id"]) == ("registered", "1.0.0")


def test_a_device_cannot_touch_another_devices_update(api, release):
    device, device_client = device_and_client(api)
    _, stranger = device_and_client(api)
    update = start(api, device, release["version"])
    offer = offered(device_client)
    assert stranger.report(update["id"], "downloading").status_code == 403
    assert stranger.download(offer["artifact_url"]).status_code == 403
    assert stranger.pending().status_code == 204
    assert api.post(f"/firmware/updates/{update['id']}/cancel").status_code == 200


def test_a_silent_device_fails_its_update(django_db_blocker, platform_logs, operator_token, release):
    """With FIRMWARE_DEVICE_TIMEOUT_SECONDS=2 (and the sweeper every 0.5 s) a device that never reports fails its
    update, and the device gets its status and version back."""
    env = {"FIRMWARE_DEVICE_TIMEOUT_SECONDS": "2", "SAGA_SWEEP_INTERVAL_SECONDS": "0.5"}
    with dedicated_platform(django_db_blocker, platform_logs, name="firmware-silent", env=env) as running:
        with http_client(running, operator_token) as api:
            platform_ready(api)
            device, device_client = device_and_client(api, firmware_version="3.1")
            update = start(api, device, release["version"])
            offered(device_client)
            dispatched = time.monotonic()
            assert device_state(api, device["id"]) == ("maintenance", "3.1")
            done = final(api, update["id"], timeout=15.0, interval=0.1)
            elapsed = time.monotonic() - dispatched
            assert done["status"] == "failed" and "device silent" in done["error"]
            assert 1.5 < elapsed < 10.0, elapsed
            assert device_state(api, device["id"]) == ("registered", "3.1")
            print(f"\nsilent device: update failed {elapsed:.2f} s after dispatch (timeout 2 s, sweep 0.5 s)")


def test_one_active_update_per_device_under_concurrency(api, release):
    """Ten concurrent requests for one device (two web processes): one update, nine 409s naming it. Then six
    concurrent forced ones: every superseded update is rolled back, one survives, and cancelling it gives the
    device back its own status and version."""
    device, device_client = device_and_client(api, firmware_version="5.0")
    body = {"device_id": device["id"], "to_version": release["version"]}
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: api.post("/firmware/updates", json=body), range(10)))
    assert sorted(response.status_code for response in responses) == [201] + [409] * 9
    (created,) = [response.json()["id"] for response in responses if response.status_code == 201]
    assert {response.json()["active_update_id"] for response in responses if response.status_code == 409} == {created}
    with ThreadPoolExecutor(6) as pool:
        forced = list(pool.map(lambda _: api.post("/firmware/updates", json={**body, "force": True}), range(6)))
    assert all(response.status_code in (201, 409) for response in forced), [r.text for r in forced]
    ids = [created] + [response.json()["id"] for response in forced if response.status_code == 201]
    assert len(ids) >= 2
    finished = {}
    survivor = offered(device_client)["update_id"]  # the one still active; the device is offered only it
    for update_id in ids:
        if update_id != survivor:
            finished[update_id] = final(api, update_id)["status"]
    assert set(finished.values()) == {"rolled_back"}
    assert [u["id"] for u in api.get(f"/firmware/updates?device_id={device['id']}&active=true").json()["results"]] == [
        survivor
    ]
    assert api.post(f"/firmware/updates/{survivor}/cancel").status_code == 200
    assert final(api, survivor)["status"] == "rolled_back"
    assert device_state(api, device["id"]) == ("registered", "5.0")
