"""The firmware HTTP API in-process (Django's test client): shapes, permissions, bad input (nothing stored)."""

import hashlib
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart
from django.utils import timezone

from devices.models import Device, DeviceStatus
from devices.testing import device_create
from firmware.models import FirmwareRelease, FirmwareUpdate
from firmware.testing import artifact_bytes, new_version, release_create, sha256_checksum
from iot.saga.testing import saga_drive, saga_queue_capture
from iot.testing.factories import operator_token_create

pytestmark = pytest.mark.django_db

UPDATE_FIELDS = {
    "id",
    "device_id",
    "from_version",
    "to_version",
    "status",
    "progress",
    "started_at",
    "completed_at",
    "error",
    "force",
    "active",
    "dispatched_at",
    "cancelled_at",
    "superseded_by",
    "rollout_id",
    "maintenance_window",
    "install_allowed",
    "device_report",
}


@pytest.fixture(autouse=True)
def _saga_in_process(redis_namespace):
    with saga_queue_capture() as queued:
        yield queued


@pytest.fixture
def operator(client):
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {operator_token_create().key}"
    return client


@pytest.fixture
def registration():
    return device_create(serial_prefix="FW-API")


def device_headers(registration) -> dict:
    return {"HTTP_AUTHORIZATION": f"Device {registration.device_token}"}


def post(client, path, body=None, **headers):
    return client.post(path, body if body is not None else {}, content_type="application/json", **headers)


def upload(client, version: str, content: bytes, method: str = "PUT", field: str = "file"):
    body = encode_multipart(BOUNDARY, {field: _named(content)})
    return client.generic(method, f"/firmware/versions/{version}/artifact", body, content_type=MULTIPART_CONTENT)


def _named(content: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("image.bin", content, content_type="application/octet-stream")


def started_update(operator, registration, **body):
    release = release_create(content=artifact_bytes(4096))
    response = post(
        operator, "/firmware/updates", {"device_id": str(registration.device.pk), "to_version": release.version, **body}
    )
    assert response.status_code == 201, response.content
    return response.json()


# --- Releases ------------------------------------------------------------------------------------


def test_register_list_and_read_a_release(operator):
    version = new_version()
    body = {
        "version": version,
        "size_bytes": 1024000,
        "checksum": "sha256-abc123",
        "release_notes": "Test version",
        "min_compatible_version": "1.0.0",
        "created_at": "2026-01-02T03:04:05",  # the seed's clients send naive UTC timestamps
    }
    created = post(operator, "/firmware/register", body)
    assert created.status_code == 201, created.content
    release = created.json()
    assert {key: release[key] for key in body} == {**body, "created_at": "2026-01-02T03:04:05Z"}
    assert (release["has_artifact"], release["artifact_sha256"], release["artifact_size"]) == (False, None, None)
    assert post(operator, "/firmware/register", body).status_code == 409
    listed = operator.get("/firmware/versions").json()
    assert [item["version"] for item in listed["results"]] == [version]
    assert operator.get(f"/firmware/versions/{version}").json()["checksum"] == "sha256-abc123"
    assert operator.get("/firmware/versions/nope").status_code == 404
    assert operator.get("/firmware/versions/bad%20label").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"checksum": "sha256-x"},
        {"version": "2.0 beta", "checksum": "sha256-x"},
        {"version": "2.0/../x", "checksum": "sha256-x"},
        {"version": "..", "checksum": "sha256-x"},
        {"version": "v" * 65, "checksum": "sha256-x"},
        {"version": 2, "checksum": "sha256-x"},
        {"version": "2.0", "checksum": 123},
        {"version": "2.0", "checksum": "  "},
        {"version": "2.0", "checksum": "sha256-\x00"},
        {"version": "2.0", "checksum": "sha256-x", "size_bytes": "5"},
        {"version": "2.0", "checksum": "sha256-x", "size_bytes": -1},
        {"version": "2.0", "checksum": "sha256-x", "size_bytes": True},
        {"version": "2.0", "checksum": "sha256-x", "size_bytes": 1e30},
        {"version": "2.0", "checksum": "sha256-x", "created_at": 1700000000},
        {"version": "2.0", "checksum": "sha256-x", "created_at": "yesterday"},
        {"version": "2.0", "checksum": "sha256-x", "created_at": "0001-01-01T00:00:00+14:00"},
        {"version": "2.0", "checksum": "sha256-x", "surprise": 1},
    ],
)
def test_a_bad_release_is_refused_and_nothing_stored(operator, body):
    response = post(operator, "/firmware/register", body)
    assert response.status_code == 400, response.content
    assert not FirmwareRelease.objects.exists()


def test_a_non_json_registration_is_refused(operator):
    assert operator.post("/firmware/register", "version=2", content_type="text/plain").status_code == 415
    assert operator.post("/firmware/register", "{", content_type="application/json").status_code == 400


def test_artifact_upload_and_download(operator, _media_root):
    content = artifact_bytes(100_000)
    release = post(operator, "/firmware/register", {"version": new_version(), "checksum": sha256_checksum(content)})
    version = release.json()["version"]
    assert operator.get(f"/firmware/versions/{version}/artifact").status_code == 404  # not uploaded yet
    uploaded = upload(operator, version, content)
    assert uploaded.status_code == 201, uploaded.content
    assert uploaded.json()["artifact_sha256"] == hashlib.sha256(content).hexdigest()
    assert uploaded.json()["artifact_size"] == len(content) and uploaded.json()["has_artifact"]
    downloaded = operator.get(f"/firmware/versions/{version}/artifact")
    assert downloaded.status_code == 200
    assert b"".join(downloaded.streaming_content) == content
    assert downloaded["X-Checksum-SHA256"] == hashlib.sha256(content).hexdigest()
    assert downloaded["Content-Type"] == "application/octet-stream"
    again = upload(operator, version, b"another file", method="POST")
    assert again.status_code == 409 and again.json()["code"] == "artifact_exists"
    assert len([path for path in Path(_media_root).rglob("*") if path.is_file()]) == 1


def test_artifact_upload_refusals(operator, settings, _media_root):
    version = release_create(content=None).version
    assert upload(operator, "no-such-version", b"x").status_code == 404
    assert upload(operator, version, b"x", field="image").status_code == 400
    assert (
        operator.put(
            f"/firmware/versions/{version}/artifact", {"file": "x"}, content_type="application/json"
        ).status_code
        == 415
    )
    settings.FIRMWARE_ARTIFACT_MAX_BYTES = 1000
    too_large = upload(operator, version, b"x" * 1001)
    assert too_large.status_code == 413 and too_large.json() == {
        "detail": "The artifact is larger than the limit of 1000 bytes.",
        "code": "artifact_too_large",
        "max_bytes": 1000,
    }
    assert not FirmwareRelease.objects.get(version=version).has_artifact
    assert not [path for path in Path(_media_root).rglob("*") if path.is_file()]
    assert upload(operator, version, b"x" * 1000).status_code == 201


# --- Updates -------------------------------------------------------------------------------------


def test_start_read_list_and_cancel_an_update(operator, registration):
    update = started_update(operator, registration)
    assert set(update) >= UPDATE_FIELDS
    assert (update["status"], update["progress"], update["from_version"], update["error"]) == (
        "pending",
        0,
        "1.0.0",
        None,
    )
    assert update["saga"]["status"] == "running" and update["saga"]["steps"][0]["name"] == "verify_artifact"
    read = operator.get(f"/firmware/updates/{update['id']}").json()
    assert read["id"] == update["id"] and read["saga"]["id"] == update["saga"]["id"]
    listed = operator.get(f"/firmware/updates?device_id={registration.device.pk}&status=pending").json()
    assert [item["id"] for item in listed["results"]] == [update["id"]]
    assert operator.get("/firmware/updates?status=installed").json()["results"] == []
    assert operator.get("/firmware/updates?active=false").json()["results"] == []
    cancelled = post(operator, f"/firmware/updates/{update['id']}/cancel", {"reason": "not today"})
    assert cancelled.status_code == 200
    assert (cancelled.json()["status"], cancelled.json()["error"]) == ("rolled_back", "not today")  # nothing to undo
    refused = post(operator, f"/firmware/updates/{update['id']}/cancel/")
    assert refused.status_code == 200  # cancelling again changes nothing


def test_one_active_update_per_device_and_force(operator, registration):
    first = started_update(operator, registration)
    release = release_create(content=b"image")
    body = {"device_id": str(registration.device.pk), "to_version": release.version}
    refused = post(operator, "/firmware/updates", body)
    assert refused.status_code == 409
    assert (refused.json()["code"], refused.json()["active_update_id"]) == ("update_active", first["id"])
    forced = post(operator, "/firmware/updates", {**body, "force": True})
    assert forced.status_code == 201 and forced.json()["force"] is True
    superseded = operator.get(f"/firmware/updates/{first['id']}").json()
    assert superseded["superseded_by"] == forced.json()["id"]
    assert superseded["status"] == "rolled_back" and "superseded by" in superseded["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"to_version": "2.0"}, 400),
        ({"device_id": "not-a-uuid", "to_version": "2.0"}, 400),
        ({"device_id": 12345, "to_version": "2.0"}, 400),
        ({"device_id": "DEVICE", "to_version": "bad label!"}, 400),
        ({"device_id": "DEVICE", "to_version": "VERSION", "force": "yes"}, 400),
        ({"device_id": "DEVICE", "to_version": "VERSION", "force": 1}, 400),
        (
            {"device_id": "DEVICE", "to_version": "VERSION", "maintenance_window": {"start": "2020-01-01T00:00:00Z"}},
            400,
        ),
        (
            {
                "device_id": "DEVICE",
                "to_version": "VERSION",
                "maintenance_window": {"start": "2020-01-01T00:00:00Z", "duration_seconds": 60},
            },
            400,
        ),
        (
            {
                "device_id": "DEVICE",
                "to_version": "VERSION",
                "maintenance_window": {"start": "9999-12-31T23:59:59Z", "duration_seconds": 2592000},
            },
            400,
        ),
        ({"device_id": "DEVICE", "to_version": "VERSION", "extra": True}, 400),
        ({"device_id": str(uuid.uuid4()), "to_version": "VERSION"}, 422),
        ({"device_id": "DEVICE", "to_version": "no-such-version"}, 422),
    ],
)
def test_a_bad_update_request_is_refused_and_nothing_stored(operator, registration, body, status):
    version = release_create(content=b"image").version
    filled = {
        key: (str(registration.device.pk) if value == "DEVICE" else version if value == "VERSION" else value)
        for key, value in body.items()
    }
    response = post(operator, "/firmware/updates", filled)
    assert response.status_code == status, response.content
    assert not FirmwareUpdate.objects.exists()


def test_unknown_and_malformed_update_ids(operator):
    for path in ("/firmware/updates/not-a-uuid", f"/firmware/updates/{uuid.uuid4()}"):
        assert operator.get(path).status_code == 404
    assert post(operator, f"/firmware/updates/{uuid.uuid4()}/cancel").status_code == 404
    assert post(operator, f"/firmware/updates/{uuid.uuid4()}/cancel", {"reason": 5}).status_code == 400


def test_a_maintenance_window_is_part_of_the_update(operator, registration):
    start = (timezone.now() + timedelta(days=1)).replace(microsecond=0)
    window = {"start": start.isoformat(), "duration_seconds": 3600}
    update = started_update(operator, registration, maintenance_window=window)
    assert update["maintenance_window"] == {
        "start": start.isoformat().replace("+00:00", "Z"),
        "end": (start + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
        "duration_seconds": 3600,
    }
    assert update["install_allowed"] is False


# --- The device's side ---------------------------------------------------------------------------


def test_the_device_polls_downloads_and_reports(operator, client, registration):
    headers = device_headers(registration)
    assert client.get("/firmware/device/update", **headers).status_code == 204
    update = started_update(operator, registration)
    assert client.get("/firmware/device/update", **headers).status_code == 204  # not dispatched yet
    saga_drive(run_id=uuid.UUID(update["saga"]["id"]))
    offered = client.get("/firmware/device/update", **headers)
    assert offered.status_code == 200
    offer = offered.json()
    assert offer["update_id"] == update["id"] and offer["install_allowed"] is True
    assert offer["artifact_url"] == f"http://testserver/firmware/versions/{offer['to_version']}/artifact"
    assert set(offer) == {
        "update_id",
        "from_version",
        "to_version",
        "status",
        "progress",
        "artifact_url",
        "checksum",
        "sha256",
        "size_bytes",
        "install_allowed",
        "maintenance_window",
    }
    download = client.get(offer["artifact_url"], **headers)
    assert download.status_code == 200
    assert hashlib.sha256(b"".join(download.streaming_content)).hexdigest() == offer["sha256"]
    other = release_create(content=b"another")
    assert client.get(f"/firmware/versions/{other.version}/artifact", **headers).status_code == 403
    reported = post(
        client, f"/firmware/updates/{update['id']}/report", {"status": "downloading", "progress": 50}, **headers
    )
    assert reported.status_code == 200, reported.content
    assert (reported.json()["status"], reported.json()["progress"]) == ("downloading", 50)
    own = client.get(f"/firmware/updates/{update['id']}", **headers)
    assert own.status_code == 200 and own.json()["progress"] == 50


def test_only_the_updates_own_device_reports_and_devices_stay_off_operator_endpoints(operator, client, registration):
    update = started_update(operator, registration)
    saga_drive(run_id=uuid.UUID(update["saga"]["id"]))
    stranger = device_headers(device_create(serial_prefix="FW-STRANGER"))
    path = f"/firmware/updates/{update['id']}/report"
    assert post(client, path, {"status": "downloading"}, **stranger).status_code == 403
    assert client.get(f"/firmware/updates/{update['id']}", **stranger).status_code == 403
    assert post(operator, path, {"status": "downloading"}).status_code == 403  # operators don't report
    assert operator.get("/firmware/device/update").status_code == 403
    own = device_headers(registration)
    for operator_path in ("/firmware/updates", "/firmware/versions"):
        assert client.get(operator_path, **own).status_code == 403
    assert post(client, "/firmware/updates", {}, **own).status_code == 403
    assert post(client, path, {"status": "downloading"}, HTTP_AUTHORIZATION="Device not-a-token").status_code == 401
    client.defaults.pop("HTTP_AUTHORIZATION", None)
    assert post(client, path, {"status": "downloading"}).status_code == 401
    assert FirmwareUpdate.objects.get(pk=update["id"]).status == "pending"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"status": "exploded"},
        {"status": "installed"},
        {"status": "installed", "version": "bad label!"},
        {"status": "downloading", "version": "2.0"},
        {"status": "downloading", "reason": "why not"},
        {"status": "downloading", "progress": 101},
        {"status": "downloading", "progress": -1},
        {"status": "downloading", "progress": "50"},
        {"status": "downloading", "progress": 50.5},
        {"status": "failed", "reason": 5},
        {"status": "failed", "reason": "x" * 1001},
        {"status": "downloading", "extra": 1},
    ],
)
def test_a_bad_report_is_refused(operator, client, registration, body):
    update = started_update(operator, registration)
    saga_drive(run_id=uuid.UUID(update["saga"]["id"]))
    response = post(client, f"/firmware/updates/{update['id']}/report", body, **device_headers(registration))
    assert response.status_code == 400, response.content
    stored = FirmwareUpdate.objects.get(pk=update["id"])
    assert (stored.status, stored.progress, stored.device_result) == ("pending", 0, None)


def test_a_decommissioned_device_cannot_be_updated(operator, registration):
    Device.objects.filter(pk=registration.device.pk).update(status=DeviceStatus.DECOMMISSIONED)
    release = release_create(content=b"image")
    response = post(
        operator, "/firmware/updates", {"device_id": str(registration.device.pk), "to_version": release.version}
    )
    assert response.status_code == 422 and "decommissioned" in response.json()["device_id"][0]
