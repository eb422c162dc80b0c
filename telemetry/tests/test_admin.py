"""The read-only admin list of a device's recent points."""

import uuid
from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from devices.services import device_register
from telemetry.models import TelemetryPoint

pytestmark = pytest.mark.django_db

URL = "/admin/telemetry/telemetrypoint/"


@pytest.fixture
def device_with_points():
    device = device_register(serial_number=f"SN-ADM-{uuid.uuid4().hex}", device_type="sensor", firmware_version="1")
    now = datetime.now(UTC)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO telemetry_point (device_id, metric, ts, value) "
            "SELECT %s, CASE WHEN g %% 2 = 0 THEN 'even' ELSE 'odd' END, %s - g * interval '1 second', g "
            "FROM generate_series(1, 150) AS g",
            [device.device.pk, now],
        )
    return device.device


def test_without_a_device_the_list_is_empty_and_says_why(admin_client, device_with_points):
    response = admin_client.get(URL)
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []
    assert b"Search for a device id" in response.content


def test_a_device_search_lists_its_newest_points_without_counting_the_table(admin_client, device_with_points):
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(URL, {"q": str(device_with_points.pk)})
    assert response.status_code == 200
    results = list(response.context["cl"].result_list)
    assert len(results) == 100
    assert results[0].value == 1.0  # newest first
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 10000" in sql for sql in counts)

    only_odd = admin_client.get(URL, {"q": f"{device_with_points.pk} odd"})
    assert {p.metric for p in only_odd.context["cl"].result_list} == {"odd"}


def test_points_are_read_only(admin_client, device_with_points):
    assert admin_client.get(URL + "add/").status_code == 403
    point = TelemetryPoint.objects.filter(device_id=device_with_points.pk).first()
    assert admin_client.post(URL, {"action": "delete_selected", "_selected_action": [point.pk]}).status_code == 200
    assert TelemetryPoint.objects.filter(device_id=device_with_points.pk).count() == 150


def test_garbage_search_shows_nothing(admin_client):
    response = admin_client.get(URL, {"q": "not-a-uuid"})
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []
