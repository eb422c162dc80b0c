"""The read-only admin list of a device's recent points."""

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from devices.models import Device
from devices.testing import device_create
from telemetry.models import TelemetryPoint

pytestmark = pytest.mark.django_db

URL = "/admin/telemetry/telemetrypoint/"


@pytest.fixture
def device_with_points():
    device = device_create(serial_prefix="SN-ADM")
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
    assert b"Search for a device&#x27;s serial number or id" in response.content


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


def _messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def test_a_serial_number_search_lists_the_devices_points(admin_client, device_with_points):
    serial = device_with_points.serial_number
    response = admin_client.get(URL, {"q": serial})
    results = list(response.context["cl"].result_list)
    assert len(results) == 100 and {p.device_id for p in results} == {device_with_points.pk}
    assert _messages(response) == []
    only_even = admin_client.get(URL, {"q": f"{serial} even"})
    assert {p.metric for p in only_even.context["cl"].result_list} == {"even"}


def test_a_serial_number_with_spaces_is_found_whole(admin_client):
    device = device_create(serial_prefix="SN ADM SPACED").device
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TelemetryPoint._meta.db_table} (device_id, metric, ts, value) "
            "VALUES (%s, 'odd', now(), 1), (%s, 'even', now(), 2)",
            [device.pk, device.pk],
        )
    everything = admin_client.get(URL, {"q": device.serial_number})
    assert sorted(p.value for p in everything.context["cl"].result_list) == [1.0, 2.0]
    odd = admin_client.get(URL, {"q": f"{device.serial_number} odd"})
    assert [p.value for p in odd.context["cl"].result_list] == [1.0]


def test_an_unknown_device_says_so(admin_client, device_with_points):
    response = admin_client.get(URL, {"q": "SN-NOBODY"})
    assert list(response.context["cl"].result_list) == []
    assert _messages(response) == [
        "No device with the serial number or id 'SN-NOBODY' (a serial number must match exactly)."
    ]
    prefix = admin_client.get(URL, {"q": device_with_points.serial_number[:-1]})
    assert list(prefix.context["cl"].result_list) == []


def test_rows_show_the_serial_number_and_times_to_the_millisecond_in_one_query(admin_client, device_with_points):
    stamp = datetime(2026, 3, 4, 5, 6, 7, 250_000, tzinfo=UTC)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TelemetryPoint._meta.db_table} (device_id, metric, ts, value) "
            "VALUES (%s, 'ms', %s, 1), (%s, 'ms', %s, 2)",
            [device_with_points.pk, stamp, device_with_points.pk, stamp.replace(microsecond=500_000)],
        )
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(URL, {"q": str(device_with_points.pk)})
    html = response.content.decode()
    assert len(response.context["cl"].result_list) == 100
    # One query for the serial numbers of the whole page, not one per row.
    device_table = f'"{Device._meta.db_table}"'
    device_queries = [q["sql"] for q in queries.captured_queries if device_table in q["sql"]]
    assert len(device_queries) == 1, device_queries
    assert html.count(f">{device_with_points.serial_number}<") == 100
    assert f">{device_with_points.pk}<" not in html

    both = admin_client.get(URL, {"q": f"{device_with_points.pk} ms"}).content.decode()
    assert ">2026-03-04 05:06:07.500+00:00<" in both
    assert ">2026-03-04 05:06:07.250+00:00<" in both
