"""`make demo`'s fleet (`manage.py run_demo`) against the live platform: rules, a release, devices sending
telemetry, alerts opening, and a staged rollout started, all over HTTP as the command does it."""

import pytest

from iot.testing.processes import run_manage, wait_until

pytestmark = pytest.mark.live


def test_the_demo_sets_up_the_fleet_and_starts_a_rollout(platform, api, tmp_path):
    output = run_manage(
        platform.env,
        "run_demo",
        "--base-url",
        platform.base_url,
        "--devices",
        "20",
        "--groups",
        "2",
        "--interval",
        "0.5",
        "--rollout-after",
        "2",
        "--duration",
        "12",
        "--state",
        str(tmp_path / "fleet.json"),
    )
    assert "demo: 20 devices in 2 groups" in output
    assert "rollout" in output and "of 2.0.0 started" in output, output
    rules = api.get("/alerts/rules", params={"group_id": "DEMO-group-0"}).json()["results"]
    assert sorted(rule["threshold"] for rule in rules) == [30.0, 45.0]
    release = api.get("/firmware/versions/2.0.0").json()
    assert release["has_artifact"] is True
    figures = api.get("/analytics/groups/DEMO-group-0").json()
    assert figures["device_count"] == 10
    wait_until(lambda: api.get("/analytics/groups/DEMO-group-0").json()["total_messages"] > 0, timeout=30)
    # The hot devices (a tenth) climbed past 30 C within the run: their groups have open alerts.
    alerts = sum(api.get(f"/analytics/groups/DEMO-group-{n}").json()["alert_count"] for n in range(2))
    assert alerts >= 1
    rollouts = api.get("/firmware/rollouts").json()["results"]
    assert any(rollout["to_version"] == "2.0.0" for rollout in rollouts)
    # Run again: nothing is created twice (the supervisor may restart it).
    again = run_manage(
        platform.env,
        "run_demo",
        "--base-url",
        platform.base_url,
        "--devices",
        "20",
        "--groups",
        "2",
        "--rollout-after",
        "1",
        "--duration",
        "3",
        "--state",
        str(tmp_path / "fleet.json"),
    )
    assert "demo: 20 devices in 2 groups" in again
    assert len(api.get("/alerts/rules", params={"group_id": "DEMO-group-0"}).json()["results"]) == 2
    assert sum(rollout["to_version"] == "2.0.0" for rollout in api.get("/firmware/rollouts").json()["results"]) == 1
