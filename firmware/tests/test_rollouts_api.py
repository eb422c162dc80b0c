"""The rollout endpoints in-process (Django's test client): shapes, progress, transitions, bad input (400/422,
nothing stored, never 500), permissions."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from devices.models import DeviceStatus
from devices.testing import device_create, devices_bulk_create
from firmware import rollouts
from firmware.models import FirmwareRollout, FirmwareUpdate
from firmware.testing import artifact_bytes, release_create, rollout_advance_capture
from iot.saga.testing import saga_queue_capture
from iot.testing.factories import operator_token_create

pytestmark = pytest.mark.django_db

COUNT_KEYS = [
    "not_started",
    "pending",
    "downloading",
    "downloaded",
    "installing",
    "installed",
    "failed",
    "rolled_back",
    "skipped",
]


@pytest.fixture(autouse=True)
def _in_process(redis_namespace):
    with saga_queue_capture(), rollout_advance_capture():
        yield


@pytest.fixture
def operator(client):
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {operator_token_create().key}"
    return client


@pytest.fixture
def release():
    return release_create(content=artifact_bytes(2048))


@pytest.fixture
def group():
    name = f"g-{uuid.uuid4().hex[:8]}"
    devices_bulk_create(count=10, group_id=name, status=DeviceStatus.ACTIVE)
    return name


def post(client, path, body=None, **headers):
    return client.post(path, body if body is not None else {}, content_type="application/json", **headers)


def test_start_read_and_list_a_rollout(operator, release, group):
    window = {"start": (timezone.now() + timedelta(hours=1)).isoformat(), "duration_seconds": 600}
    body = {
        "to_version": release.version,
        "group_id": group,
        "stages": [10, 50, 100],
        "success_threshold": 0.8,
        "error_threshold": 0.25,
        "maintenance_window": window,
    }
    response = post(operator, "/firmware/rollouts", body)
    assert response.status_code == 201, response.content
    rollout = response.json()
    assert rollout["status"] == "running" and rollout["current_stage"] == 1 and rollout["stages"] == [10, 50, 100]
    assert rollout["target"] == {"group_id": group, "device_type": None, "from_version": None, "device_status": None}
    assert (rollout["success_threshold"], rollout["error_threshold"], rollout["error_min_finished"]) == (0.8, 0.25, 5)
    assert rollout["maintenance_window"]["duration_seconds"] == 600
    progress = rollout["progress"]
    assert progress["targets"] == 10 and list(progress["counts"]) == COUNT_KEYS
    assert progress["counts"]["not_started"] == 10 and progress["success_rate"] is None
    assert [(s["stage"], s["percent"], s["targets"], s["state"]) for s in progress["per_stage"]] == [
        (1, 10.0, 1, "running"),
        (2, 50.0, 4, "waiting"),
        (3, 100.0, 5, "waiting"),
    ]

    rollouts.firmware_rollout_advance(rollout_id=uuid.UUID(rollout["id"]))  # what the worker does next
    detail = operator.get(f"/firmware/rollouts/{rollout['id']}").json()
    assert detail["progress"]["counts"]["pending"] == 1 and detail["progress"]["per_stage"][0]["counts"]["pending"] == 1
    update = FirmwareUpdate.objects.get(rollout_id=rollout["id"])
    assert update.maintenance_window_start is not None
    listed = operator.get(f"/firmware/updates?rollout_id={rollout['id']}").json()["results"]
    assert [item["id"] for item in listed] == [str(update.pk)] and listed[0]["rollout_id"] == rollout["id"]

    page = operator.get("/firmware/rollouts?status=running").json()
    assert [item["id"] for item in page["results"]] == [rollout["id"]]
    assert (
        page["results"][0]["progress"]["counts"]["pending"] == 1 and "per_stage" not in page["results"][0]["progress"]
    )
    assert operator.get("/firmware/rollouts?status=paused").json()["results"] == []


def test_pause_resume_cancel_over_http(operator, release, group):
    rollout_id = post(operator, "/firmware/rollouts", {"to_version": release.version, "group_id": group}).json()["id"]
    paused = post(operator, f"/firmware/rollouts/{rollout_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert post(operator, f"/firmware/rollouts/{rollout_id}/pause").status_code == 200  # a repeat
    resumed = post(operator, f"/firmware/rollouts/{rollout_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "running"
    cancelled = post(operator, f"/firmware/rollouts/{rollout_id}/cancel", {"reason": "bad build"})
    assert cancelled.status_code == 200, cancelled.content
    assert (cancelled.json()["status"], cancelled.json()["stop_reason"]) == ("cancelled", "bad build")
    refused = post(operator, f"/firmware/rollouts/{rollout_id}/resume")
    assert refused.status_code == 409 and refused.json()["code"] == "invalid_transition"
    assert refused.json()["status"] == "cancelled"
    assert post(operator, f"/firmware/rollouts/{rollout_id}/pause", {"surprise": 1}).status_code == 400
    assert post(operator, f"/firmware/rollouts/{rollout_id}/cancel", {"reason": 5}).status_code == 400


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stages": [50, 20, 100]}, "stages"),
        ({"stages": [10, 50]}, "stages"),
        ({"stages": [0, 100]}, "stages"),
        ({"stages": []}, "stages"),
        ({"stages": "10,100"}, "stages"),
        ({"stages": ["10", 100]}, "stages"),
        ({"stages": [10, None, 100]}, "stages"),
        ({"stages": {"a": 1}}, "stages"),
        ({"stages": list(range(1, 30)) + [100]}, "stages"),
        ({"success_threshold": 1.1}, "success_threshold"),
        ({"success_threshold": -0.5}, "success_threshold"),
        ({"success_threshold": "0.9"}, "success_threshold"),
        ({"error_threshold": 2}, "error_threshold"),
        ({"error_threshold": True}, "error_threshold"),
        ({"error_min_finished": 0}, "error_min_finished"),
        ({"error_min_finished": 1.5}, "error_min_finished"),
        ({"device_status": "decommissioned"}, "device_status"),
        ({"from_version": "not a label"}, "from_version"),
        ({"name": ""}, "name"),
        ({"name": "x\x00y"}, "name"),
        ({"group_id": 7}, "group_id"),
        ({"maintenance_window": {"start": "2020-01-01T00:00:00Z", "duration_seconds": 60}}, "maintenance_window"),
        ({"maintenance_window": {"start": "soon"}}, "maintenance_window"),
        ({"surprise": 1}, "surprise"),
        ({"to_version": None}, "to_version"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_stores_nothing(operator, release, group, change, field):
    body = {"to_version": release.version, "group_id": group, **change}
    response = post(operator, "/firmware/rollouts", body)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert isinstance(response.json()[field], list)
    assert not FirmwareRollout.objects.exists()


def test_unknown_version_no_artifact_and_empty_target_are_422(operator, release, group):
    unknown = post(operator, "/firmware/rollouts", {"to_version": "no-such-version", "group_id": group})
    assert unknown.status_code == 422 and "to_version" in unknown.json()
    bare = release_create(content=None)
    no_artifact = post(operator, "/firmware/rollouts", {"to_version": bare.version, "group_id": group})
    assert no_artifact.status_code == 422 and "no artifact" in no_artifact.json()["to_version"][0]
    empty = post(operator, "/firmware/rollouts", {"to_version": release.version, "group_id": "nobody-here"})
    assert empty.status_code == 422 and empty.json()["code"] == "no_targets"
    assert not FirmwareRollout.objects.exists()
    assert post(operator, "/firmware/rollouts", "[1, 2]").status_code == 400
    assert operator.post("/firmware/rollouts", "to_version=x", content_type="text/plain").status_code == 415


def test_unknown_and_malformed_rollout_ids_are_404(operator):
    for path in (f"/firmware/rollouts/{uuid.uuid4()}", "/firmware/rollouts/not-a-uuid"):
        assert operator.get(path).status_code == 404
        assert post(operator, f"{path}/pause").status_code == 404
    assert operator.get("/firmware/rollouts?status=nope").status_code == 400
    assert operator.get("/firmware/rollouts?cursor=%%%").status_code == 400


def test_devices_and_anonymous_clients_are_refused(client, release, group):
    assert client.get("/firmware/rollouts").status_code == 401
    registration = device_create()
    device = {"HTTP_AUTHORIZATION": f"Device {registration.device_token}"}
    assert client.get("/firmware/rollouts", **device).status_code == 403
    body = {"to_version": release.version, "group_id": group}
    assert post(client, "/firmware/rollouts", body, **device).status_code == 403
    assert not FirmwareRollout.objects.exists()
