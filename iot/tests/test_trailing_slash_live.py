"""A path with one trailing slash is served like the path without it, for every method.

Served in place rather than redirected: device HTTP clients commonly don't follow a
redirect on a POST, or follow it as a GET without the body.
"""

import uuid
from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.live


@pytest.fixture
def device(api):
    body = {"serial_number": f"SN-SLASH-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1.0.0"}
    response = api.post("/devices/", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["serial_number"] == body["serial_number"]
    return response.json()


def test_registering_reading_and_updating_a_device_with_slashes(api, device):
    listing = api.get("/devices/", params={"serial_number": device["serial_number"]})
    assert listing.status_code == 200, listing.text
    assert [found["id"] for found in listing.json()["results"]] == [device["id"]]

    read = api.get(f"/devices/{device['id']}/")
    assert read.status_code == 200 and read.json()["id"] == device["id"]

    patched = api.patch(f"/devices/{device['id']}/", json={"location": "Hall 7"})
    assert patched.status_code == 200, patched.text
    assert api.get(f"/devices/{device['id']}").json()["location"] == "Hall 7"


def test_links_in_a_page_name_the_path_without_the_slash(api, device):
    page = api.get("/devices/", params={"limit": 1})
    assert page.status_code == 200
    next_link = page.json()["next"]
    assert next_link and "/devices?" in next_link and "/devices/?" not in next_link


def test_a_device_sends_and_reads_its_telemetry_with_slashes(anonymous, device):
    headers = {"Authorization": f"Device {device['device_token']}"}
    point = {"device_id": device["id"], "timestamp": datetime.now(UTC).isoformat(), "metric": "rpm", "value": 7.5}
    sent = anonymous.post("/telemetry/point/", json=point, headers=headers)
    assert sent.status_code == 202, sent.text
    points = anonymous.get(f"/telemetry/{device['id']}/", headers=headers)
    assert points.status_code == 200
    assert [p["value"] for p in points.json()] == [7.5]
    latest = anonymous.get(f"/telemetry/{device['id']}/rpm/latest/", headers=headers)
    assert latest.status_code == 200 and latest.json()["value"] == 7.5


def test_other_paths_with_a_slash(anonymous, api):
    assert anonymous.get("/health/live/").status_code == 200
    assert anonymous.get("/api/schema/").status_code == 200
    # Still checked like the path without the slash: no credentials, no devices.
    assert anonymous.get("/devices/").status_code == 401
    for path in ("/devices//", "/nothing-here/", "/devices/x/y/"):
        response = api.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "Not found."}, path
