"""`Idempotency-Key` on ingestion: a retried request is stored once, over HTTP against the live server.

A client whose connection dropped after the commit cannot know its points were
stored; with a key, its retry replays the first 202 instead of storing them twice.
"""

import threading
import uuid

import pytest

from iot.testing.live import register_device
from iot.testing.telemetry import batch_body, point_body
from telemetry.testing import stored_points

pytestmark = pytest.mark.live


@pytest.fixture
def device(api):
    return register_device(api, prefix="SN-IDEM")


def _key() -> dict[str, str]:
    return {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}


def test_a_retried_point_is_stored_once(api, device, django_db_blocker):
    headers, body = _key(), point_body(device["id"])
    first = api.post("/telemetry/point", json=body, headers=headers)
    retry = api.post("/telemetry/point", json=body, headers=headers)
    assert first.status_code == retry.status_code == 202
    assert first.json() == retry.json() == {"status": "accepted"}
    assert "Idempotent-Replayed" not in first.headers and retry.headers["Idempotent-Replayed"] == "true"
    assert first.headers["X-RateLimit-Remaining"] == "99"
    assert stored_points(django_db_blocker, device["id"]) == 1


def test_concurrent_retries_of_a_batch_from_both_processes_store_it_once(api, device, django_db_blocker):
    headers, body = _key(), batch_body(device["id"], 50)
    statuses, replayed = [], []
    lock = threading.Lock()

    def send():
        response = api.post("/telemetry/batch", json=body, headers=headers)
        with lock:
            statuses.append(response.status_code)
            replayed.append(response.headers.get("Idempotent-Replayed") == "true")

    threads = [threading.Thread(target=send) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [202] * 20
    assert replayed.count(False) == 1
    assert stored_points(django_db_blocker, device["id"]) == 50


def test_replays_take_nothing_from_the_rate_limit(api, device, django_db_blocker):
    headers, body = _key(), batch_body(device["id"], 60)
    for _ in range(4):
        assert api.post("/telemetry/batch", json=body, headers=headers).status_code == 202
    # 60 stored and counted once: 40 more still fit the 100-point window.
    assert api.post("/telemetry/batch", json=batch_body(device["id"], 40, start_offset=-30)).status_code == 202
    assert stored_points(django_db_blocker, device["id"]) == 100


def test_the_same_key_with_another_body_is_422_and_stores_nothing(api, device, django_db_blocker):
    headers = _key()
    assert api.post("/telemetry/point", json=point_body(device["id"], value=1.0), headers=headers).status_code == 202
    reused = api.post("/telemetry/point", json=point_body(device["id"], value=2.0), headers=headers)
    assert reused.status_code == 422
    assert stored_points(django_db_blocker, device["id"]) == 1


def test_a_refusal_is_not_replayed(api, device, django_db_blocker):
    """Only a 202 is kept for replay: a request refused (here: decommissioned device) is tried afresh."""
    headers, body = _key(), point_body(device["id"])
    assert api.patch(f"/devices/{device['id']}", json={"status": "decommissioned"}).status_code == 200
    assert api.post("/telemetry/point", json=body, headers=headers).status_code == 422
    assert api.patch(f"/devices/{device['id']}", json={"status": "active"}).status_code == 200
    retry = api.post("/telemetry/point", json=body, headers=headers)
    assert retry.status_code == 202 and "Idempotent-Replayed" not in retry.headers
    assert stored_points(django_db_blocker, device["id"]) == 1


def test_keys_are_scoped_per_endpoint_and_caller(api, device, django_db_blocker):
    """The same key on the point and the batch endpoint names two different requests."""
    headers = _key()
    assert api.post("/telemetry/point", json=point_body(device["id"]), headers=headers).status_code == 202
    batch = api.post("/telemetry/batch", json=batch_body(device["id"], 3), headers=headers)
    assert batch.status_code == 202 and "Idempotent-Replayed" not in batch.headers
    assert stored_points(django_db_blocker, device["id"]) == 4


def test_a_bad_key_is_400(api, device, django_db_blocker):
    response = api.post("/telemetry/point", json=point_body(device["id"]), headers={"Idempotency-Key": "x" * 300})
    assert response.status_code == 400 and "Idempotency-Key" in response.json()
    assert stored_points(django_db_blocker, device["id"]) == 0
