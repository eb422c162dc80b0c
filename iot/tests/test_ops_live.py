"""Ops endpoints of the live platform: health, readiness, metrics, API docs."""

import pytest

pytestmark = pytest.mark.live


def test_liveness_needs_no_auth(anonymous):
    response = anonymous.get("/health/live")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_when_database_redis_and_a_worker_are_up(anonymous, platform):
    from iot.testing.processes import wait_until

    # The Celery worker started by the fixture must have sent its heartbeat.
    response = wait_until(
        lambda: (r := anonymous.get("/health/ready")).status_code == 200 and r,
        timeout=60,
        message="readiness (worker heartbeat)",
    )
    assert response.json()["checks"] == {"database": "ok", "redis": "ok", "workers": "ok", "redis_policy": "ok"}


def test_metrics_is_prometheus_text_aggregated_over_processes(api, anonymous):
    for _ in range(20):
        api.get("/devices", params={"limit": 1})
    text = anonymous.get("/metrics").text
    assert "# TYPE iot_http_requests_total counter" in text
    assert 'iot_http_requests_total{method="GET",route="^devices$",status="200"}' in text
    assert "iot_http_request_duration_seconds_bucket" in text
    assert "iot_process_resident_memory_bytes" in text


def test_openapi_schema_and_docs(anonymous):
    schema = anonymous.get("/api/schema", headers={"Accept": "application/json"})
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/devices", "/devices/{id}"} <= set(paths)
    assert "Idempotency-Key" in str(paths["/devices"]["post"]["parameters"])
    assert anonymous.get("/api/docs").status_code == 200


def test_admin_login_page_and_static_files_are_served(anonymous):
    assert anonymous.get("/admin/login/").status_code == 200
    assert anonymous.get("/static/admin/css/base.css").status_code == 200


def test_oversized_body_is_413_before_it_is_read(api):
    response = api.post("/devices", content=b"x" * (5 * 1024 * 1024), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_oversized_chunked_body_without_length_is_413(api):
    def chunks():
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    response = api.post("/devices", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
