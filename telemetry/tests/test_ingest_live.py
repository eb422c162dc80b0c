"""Ingestion and reads over HTTP against the live multi-process platform: the happy paths,
who may send/read what, the seed task-8 telemetry check, and the metrics."""

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from iot.testing.live import metric_value, register_device, scrape
from iot.testing.processes import wait_until
from iot.testing.telemetry import batch_body, point_body
from telemetry.testing import stored_points

pytestmark = pytest.mark.live


@pytest.fixture
def device(api):
    return register_device(api)


@pytest.fixture
def device_client(platform, device):
    with httpx.Client(
        base_url=platform.base_url, headers={"Authorization": f"Device {device['device_token']}"}, timeout=30
    ) as client:
        yield client


def test_point_is_accepted_stored_and_readable(api, device, django_db_blocker):
    response = api.post("/telemetry/point", json=point_body(device["id"], value=21.5))
    assert response.status_code == 202, response.text
    assert response.json() == {"status": "accepted"}
    assert response.headers["X-RateLimit-Limit"] == "100"
    assert response.headers["X-RateLimit-Remaining"] == "99"
    assert stored_points(django_db_blocker, device["id"]) == 1

    points = api.get(f"/telemetry/{device['id']}").json()
    assert len(points) == 1
    assert points[0]["device_id"] == device["id"]
    assert points[0]["metric"] == "temperature" and points[0]["value"] == 21.5
    assert points[0]["received_at"]


def test_batch_is_accepted_whole_and_counts_points(api, device, django_db_blocker):
    response = api.post("/telemetry/batch", json=batch_body(device["id"], 20))
    assert response.status_code == 202, response.text
    assert response.json() == {"status": "accepted", "count": 20}
    assert response.headers["X-RateLimit-Remaining"] == "80"
    assert stored_points(django_db_blocker, device["id"]) == 20


def test_batch_points_may_repeat_the_device_id_or_leave_it_out(api, device, django_db_blocker):
    body = batch_body(device["id"], 4)
    del body["points"][0]["device_id"]
    body["points"][1]["device_id"] = device["id"].upper()
    assert api.post("/telemetry/batch", json=body).status_code == 202
    assert stored_points(django_db_blocker, device["id"]) == 4


def test_a_point_sent_again_is_stored_once_and_answered_202(api, device, django_db_blocker):
    """A retry without an Idempotency-Key (the first answer was lost): 202 again, nothing stored twice,
    the first value kept; the retry still counts against the rate limit (a new request to admission)."""
    body = point_body(device["id"], value=1.0)
    first = api.post("/telemetry/point", json=body)
    again = api.post("/telemetry/point", json={**body, "value": 2.0})
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json() == {"status": "accepted"}
    assert again.json() == {"status": "accepted", "duplicates": 1}
    assert int(again.headers["X-RateLimit-Remaining"]) == int(first.headers["X-RateLimit-Remaining"]) - 1
    assert stored_points(django_db_blocker, device["id"]) == 1
    assert api.get(f"/telemetry/{device['id']}/temperature/latest").json()["value"] == 1.0


def test_a_batch_retried_after_a_lost_response_stores_each_point_once(api, device, django_db_blocker):
    """Seed clients stamp points with utcnow() in a tight loop: equal timestamps of one metric are one point.
    The batch repeats a point within itself, then is sent again whole; the counts stay those of the rows."""
    body = batch_body(device["id"], 10)
    body["points"].append({**body["points"][3], "value": 99.0})
    first = api.post("/telemetry/batch", json=body)
    assert first.status_code == 202 and first.json() == {"status": "accepted", "count": 11, "duplicates": 1}
    retry = api.post("/telemetry/batch", json=body)
    assert retry.status_code == 202 and retry.json() == {"status": "accepted", "count": 11, "duplicates": 11}
    assert stored_points(django_db_blocker, device["id"]) == 10
    values = sorted(point["value"] for point in api.get(f"/telemetry/{device['id']}").json())
    assert values == [float(i) for i in range(10)]  # not 99.0: the first value of the point stays

    def counted() -> int:
        return api.get(f"/analytics/devices/{device['id']}").json()["message_count"]

    wait_until(lambda: counted() >= 10, timeout=30, message="the device's message count")
    assert counted() == 10


def test_concurrent_identical_points_store_exactly_one_row(api, device, django_db_blocker):
    """The same point from 8 clients at once (an MQTT redelivery racing its original, a retry racing its
    first try) across both web processes: all 202, one row, the other 7 answered and counted as duplicates."""
    body = point_body(device["id"])
    before = metric_value(api, "iot_telemetry_points_total", outcome="duplicate")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: api.post("/telemetry/point", json=body), range(8)))
    assert [answer.status_code for answer in answers] == [202] * 8
    assert sum(answer.json().get("duplicates", 0) for answer in answers) == 7
    assert stored_points(django_db_blocker, device["id"]) == 1
    assert metric_value(api, "iot_telemetry_points_total", outcome="duplicate") == before + 7


@pytest.mark.parametrize("form", ["naive", "zulu", "offset"])
def test_timestamps_with_and_without_offset(api, device, form):
    """ISO 8601 with or without an offset; without one it means UTC (what `utcnow().isoformat()` sends)."""
    moment = datetime.now(UTC).replace(microsecond=123456) - timedelta(minutes=10)
    sent = {
        "naive": moment.replace(tzinfo=None).isoformat(),
        "zulu": moment.replace(tzinfo=None).isoformat() + "Z",
        "offset": moment.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
    }[form]
    assert api.post("/telemetry/point", json=point_body(device["id"], timestamp=sent)).status_code == 202
    latest = api.get(f"/telemetry/{device['id']}/temperature/latest").json()
    assert datetime.fromisoformat(latest["timestamp"].replace("Z", "+00:00")) == moment


def test_telemetry_marks_device_active_and_seen(api, device):
    """Seed task 8: after a point, the device reads back active with last_seen set (no stale cache)."""
    before = api.get(f"/devices/{device['id']}").json()  # warms the device cache
    assert before["status"] == "registered" and before["last_seen"] is None
    assert api.post("/telemetry/point", json=point_body(device["id"])).status_code == 202
    after = api.get(f"/devices/{device['id']}").json()
    assert after["status"] == "active"
    assert after["last_seen"] is not None


def test_device_token_may_send_and_read_only_its_own(api, device, device_client, django_db_blocker):
    other = register_device(api)
    assert device_client.post("/telemetry/point", json=point_body(device["id"])).status_code == 202
    assert device_client.post("/telemetry/batch", json=batch_body(device["id"], 3)).status_code == 202

    forbidden = device_client.post("/telemetry/point", json=point_body(other["id"]))
    assert forbidden.status_code == 403
    assert device_client.post("/telemetry/batch", json=batch_body(other["id"], 3)).status_code == 403
    assert stored_points(django_db_blocker, other["id"]) == 0

    assert len(device_client.get(f"/telemetry/{device['id']}").json()) == 4
    assert device_client.get(f"/telemetry/{device['id']}/temperature/latest").status_code == 200
    assert device_client.get(f"/telemetry/{other['id']}").status_code == 403
    assert device_client.get(f"/telemetry/{other['id']}/temperature/latest").status_code == 403
    # Device credentials are for telemetry: the operator API stays closed to them.
    assert device_client.get("/devices").status_code == 403


def test_unauthenticated_is_401(anonymous, device, django_db_blocker):
    assert anonymous.post("/telemetry/point", json=point_body(device["id"])).status_code == 401
    assert anonymous.post("/telemetry/batch", json=batch_body(device["id"], 2)).status_code == 401
    assert anonymous.get(f"/telemetry/{device['id']}").status_code == 401
    assert anonymous.get(f"/telemetry/{device['id']}/temperature/latest").status_code == 401
    bad_device_token = {"Authorization": "Device not-a-real-token"}
    assert (
        anonymous.post("/telemetry/point", json=point_body(device["id"]), headers=bad_device_token).status_code == 401
    )
    assert stored_points(django_db_blocker, device["id"]) == 0


def test_query_newest_first_with_filters_and_limit(api, device):
    base = datetime.now(UTC) - timedelta(hours=1)
    points = [
        {"timestamp": (base + timedelta(minutes=i)).isoformat(), "metric": metric, "value": float(i)}
        for i in range(10)
        for metric in ("temperature", "humidity")
    ]
    assert api.post("/telemetry/batch", json={"device_id": device["id"], "points": points}).status_code == 202

    everything = api.get(f"/telemetry/{device['id']}", params={"limit": 1000}).json()
    assert len(everything) == 20
    stamps = [p["timestamp"] for p in everything]
    assert stamps == sorted(stamps, reverse=True)

    humidity = api.get(f"/telemetry/{device['id']}", params={"metric": "humidity", "limit": 3}).json()
    assert [p["value"] for p in humidity] == [9.0, 8.0, 7.0]
    assert {p["metric"] for p in humidity} == {"humidity"}

    window = api.get(
        f"/telemetry/{device['id']}",
        params={
            "start_time": (base + timedelta(minutes=2)).isoformat(),
            "end_time": (base + timedelta(minutes=4)).isoformat(),
        },
    ).json()
    assert sorted(p["value"] for p in window) == [2.0, 2.0, 3.0, 3.0, 4.0, 4.0]

    newest_two = api.get(f"/telemetry/{device['id']}", params={"limit": 2}).json()
    assert [p["value"] for p in newest_two] == [9.0, 9.0]

    latest = api.get(f"/telemetry/{device['id']}/humidity/latest")
    assert latest.status_code == 200 and latest.json()["value"] == 9.0


def test_metric_names_with_slashes_and_colons(api, device):
    body = point_body(device["id"], metric="rack/2:temp.c-1_x")
    assert api.post("/telemetry/point", json=body).status_code == 202
    response = api.get(f"/telemetry/{device['id']}/rack/2:temp.c-1_x/latest")
    assert response.status_code == 200 and response.json()["metric"] == "rack/2:temp.c-1_x"


def test_latest_404_when_no_point_or_unknown_device(api, device):
    assert api.get(f"/telemetry/{device['id']}/temperature/latest").status_code == 404
    assert api.get(f"/telemetry/{uuid.uuid4()}/temperature/latest").status_code == 404
    assert api.get("/telemetry/not-a-uuid/temperature/latest").status_code == 404
    assert api.get(f"/telemetry/{device['id']}/bad metric!/latest").status_code == 404


@pytest.mark.parametrize("device_ref", [str(uuid.uuid4()), "not-a-uuid", "123"])
def test_query_unknown_or_malformed_device_is_404(api, device_ref):
    response = api.get(f"/telemetry/{device_ref}")
    assert response.status_code == 404
    assert response.json() == {"detail": "No device with this id."}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"end_time": "2024-13-01T00:00:00"}, "end_time"),
        ({"start_time": "2024-02-01T00:00:00Z", "end_time": "2024-01-01T00:00:00Z"}, "end_time"),
        ({"metric": "bad metric"}, "metric"),
        ({"metric": "m" * 129}, "metric"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_query_parameters_are_400(api, device, params, field):
    response = api.get(f"/telemetry/{device['id']}", params=params)
    assert response.status_code == 400, response.text
    assert field in response.json()


def test_points_counter_counts_points_by_outcome(api, device):
    before_accepted = metric_value(api, "iot_telemetry_points_total", outcome="accepted")
    before_invalid = metric_value(api, "iot_telemetry_points_total", outcome="invalid")
    assert api.post("/telemetry/batch", json=batch_body(device["id"], 7)).status_code == 202
    bad = batch_body(device["id"], 5)
    bad["points"][2]["value"] = "hot"
    assert api.post("/telemetry/batch", json=bad).status_code == 400
    assert metric_value(api, "iot_telemetry_points_total", outcome="accepted") == before_accepted + 7
    assert metric_value(api, "iot_telemetry_points_total", outcome="invalid") == before_invalid + 5
    samples = scrape(api)
    for outcome in ("rate_limited", "backpressure", "duplicate"):
        assert ("iot_telemetry_points_total", (("outcome", outcome),)) in samples
