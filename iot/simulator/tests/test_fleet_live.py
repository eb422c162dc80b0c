"""The fleet simulator against the live platform (web x2 + worker) over real HTTP."""

import io
import json
import signal
import subprocess
import sys

import pytest
from django.core.management import call_command

from iot.simulator.client import RegistrationError
from iot.simulator.fleet import FleetSimulator
from iot.testing.live import dedicated_platform
from iot.testing.processes import REPO_ROOT, http_client, wait_until

pytestmark = pytest.mark.live

METRICS = ("temperature", "humidity", "battery")


def stored_points(api, device_id: str) -> list[dict]:
    response = api.get(f"/telemetry/{device_id}", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()


def assert_points_arrived(api, stats):
    """Every point a device saw accepted is stored (one cancelled in-flight batch may be stored unseen)."""
    for device in stats.per_device:
        points = stored_points(api, device.device_id)
        assert device.stats.points_accepted <= len(points) <= device.stats.points_accepted + len(METRICS), device
        assert {point["metric"] for point in points} == set(METRICS)


def test_fleet_registers_in_groups_and_its_telemetry_arrives(api, operator_token, platform, unique_id, tmp_path):
    fleet = FleetSimulator(
        base_url=platform.base_url,
        operator_token=operator_token,
        devices=20,
        groups=4,
        prefix=f"SIMT-{unique_id}",
        interval=0.5,
        alert_rate=0.25,
        ota=False,
        seed=1,
        state_path=tmp_path / "state.json",
    )
    registration = fleet.register()
    assert (registration.created, registration.existing, registration.token_unknown) == (20, 0, [])

    met = fleet.run_until(
        lambda stats: all(device.stats.points_accepted >= 9 for device in stats.per_device), timeout=30
    )
    stats = fleet.stats()
    assert met, stats.summary_line()
    assert stats.devices == 20 and stats.crashed == 0 and stats.auth_failed == 0
    assert stats.points_rejected == 0 and stats.transport_errors == 0 and stats.server_errors == 0
    assert_points_arrived(api, stats)

    for group in range(4):
        response = api.get("/devices", params={"group_id": f"SIMT-{unique_id}-group-{group}", "limit": 100})
        assert response.status_code == 200
        assert len(response.json()["results"]) == 5
    device = api.get(f"/devices/{stats.per_device[0].device_id}").json()
    assert device["serial_number"] == f"SIMT-{unique_id}-0" and device["status"] == "active"
    assert device["firmware_version"] == "1.0.0" and device["metadata"]["simulated"] is True

    # A second run of the same fleet reuses the devices, with the tokens from the state file.
    again = FleetSimulator(
        base_url=platform.base_url,
        operator_token=operator_token,
        devices=20,
        groups=4,
        prefix=f"SIMT-{unique_id}",
        interval=0.5,
        ota=False,
        seed=1,
        state_path=tmp_path / "state.json",
    )
    registration = again.register()
    assert (registration.created, registration.existing, registration.token_unknown) == (0, 20, [])
    assert {device.identity.id for device in again.devices} == {device.device_id for device in stats.per_device}
    assert again.run_until(lambda s: s.points_accepted >= 60, timeout=30)
    assert again.stats().auth_failed == 0

    # Without the state file, and with another body (so no Idempotency-Key replay hands the 201 back),
    # the tokens are unknown: those devices are named and left out.
    blind = FleetSimulator(
        base_url=platform.base_url,
        operator_token=operator_token,
        devices=20,
        groups=4,
        prefix=f"SIMT-{unique_id}",
        firmware_version="9.9.9",
        state_path=tmp_path / "other-state.json",
    )
    registration = blind.register()
    assert registration.existing == 20 and len(registration.token_unknown) == 20 and blind.devices == []
    assert f"SIMT-{unique_id}-7" in registration.token_unknown


def test_command_runs_a_fleet_and_writes_its_stats(api, operator_token, platform, unique_id, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "simulate_fleet",
        "--base-url",
        platform.base_url,
        "--token",
        operator_token,
        "--devices",
        "6",
        "--groups",
        "2",
        "--prefix",
        f"SIMC-{unique_id}",
        "--interval",
        "0.5",
        "--no-ota",
        "--duration",
        "3",
        "--summary-interval",
        "1",
        "--state",
        str(tmp_path / "state.json"),
        "--json",
        str(tmp_path / "stats.json"),
        stdout=out,
        stderr=err,
    )
    output = out.getvalue()
    assert "Registered in" in output and "6 new" in output
    assert output.count("points sent=") >= 3  # periodic lines and the final one
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["devices"] == 6 and stats["points_accepted"] >= 6 * 3 * 2
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["devices"]) == 6
    for device in stats["per_device"]:
        assert len(stored_points(api, device["device_id"])) >= device["stats"]["points_accepted"] > 0
        assert state["devices"][device["serial_number"]]["id"] == device["device_id"]


def test_devices_honour_retry_after_when_rate_limited(django_db_blocker, platform_logs, operator_token, unique_id):
    # 6 points per device per 4 s: two 3-point batches pass, the next is refused with Retry-After.
    env = {"RATE_LIMIT_TELEMETRY_PER_DEVICE": "6", "RATE_LIMIT_WINDOW_SECONDS": "4"}
    with dedicated_platform(django_db_blocker, platform_logs, name="sim-429", env=env, worker=False) as running:
        fleet = FleetSimulator(
            base_url=running.base_url,
            operator_token=operator_token,
            devices=5,
            prefix=f"SIMR-{unique_id}",
            interval=0.2,
            ota=False,
            seed=2,
        )
        fleet.register()
        stats = fleet.run(duration=6)
        with http_client(running, operator_token) as client:
            assert_points_arrived(client, stats)
    assert stats.refused_429 >= 5 and stats.backoff_seconds > 5
    for device in stats.per_device:
        # A device ignoring Retry-After would send ~30 requests at 0.2 s; honouring it, about one
        # accepted pair and one refusal per 4 s window.
        assert device.stats.requests <= 10, device
        assert device.stats.refused_429 >= 1
        # The refused points were kept and sent again: nothing dropped, every accepted point stored.
        assert device.stats.points_dropped == 0


def test_command_stops_cleanly_on_ctrl_c(api, platform, unique_id, tmp_path):
    """Without --duration it runs until SIGINT, then prints the final summary and writes its stats."""
    stats_path = tmp_path / "stats.json"
    argv = [
        sys.executable,
        str(REPO_ROOT / "manage.py"),
        "simulate_fleet",
        "--base-url",
        platform.base_url,
        # Creates the operator and its token in the platform's (test) database, committed.
        "--operator",
        f"sim-operator-{unique_id}",
        "--devices",
        "3",
        "--prefix",
        f"SIMI-{unique_id}",
        "--interval",
        "0.3",
        "--no-ota",
        "--state",
        str(tmp_path / "state.json"),
        "--json",
        str(stats_path),
    ]
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=platform.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(
            lambda: (tmp_path / "state.json").exists() and points_stored_for_state(api, tmp_path) >= 3,
            timeout=60,
            message="the fleet sending",
        )
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err.decode()
    assert b"until Ctrl-C" in out and b"Final: " in out
    stats = json.loads(stats_path.read_text())
    assert stats["devices"] == 3 and stats["points_accepted"] >= 3


def points_stored_for_state(api, tmp_path) -> int:
    state = json.loads((tmp_path / "state.json").read_text())
    return sum(len(stored_points(api, entry["id"])) for entry in state["devices"].values())


def test_registration_with_a_bad_operator_token_is_an_error(platform, unique_id):
    fleet = FleetSimulator(
        base_url=platform.base_url, operator_token="not-a-token", devices=2, prefix=f"SIMX-{unique_id}"
    )
    with pytest.raises(RegistrationError, match="HTTP 401"):
        fleet.register()
    assert fleet.devices == []
