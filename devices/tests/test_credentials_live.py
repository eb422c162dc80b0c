"""Device credentials against the live multi-process server: what is kept of them, and when they stop working."""

import threading

import pytest
from django.db import connection
from django.test import Client

from iot.idempotency.models import IdempotencyKey
from iot.testing.factories import user_create
from iot.testing.live import register_device
from iot.testing.telemetry import point_body

pytestmark = pytest.mark.live


def send_point(anonymous, device):
    body = point_body(device["id"], value=21.5)
    return anonymous.post("/telemetry/point", json=body, headers={"Authorization": f"Device {device['device_token']}"})


def test_a_registration_replay_returns_the_credential_postgres_keeps_only_encrypted(
    api, anonymous, unique_id, django_db_blocker
):
    key = f"cred-{unique_id}"
    device = register_device(api, serial_number=f"SN-CRED-{unique_id}", idempotency_key=key)
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(f"SELECT k::text FROM {IdempotencyKey._meta.db_table} AS k WHERE key = %s", [key])
        (row,) = cursor.fetchall()
    assert key in row[0]
    assert device["device_token"] not in row[0]
    replay = api.post(
        "/devices",
        json={"serial_number": f"SN-CRED-{unique_id}", "device_type": "sensor", "firmware_version": "1.0.0"},
        headers={"Idempotency-Key": key},
    )
    assert (replay.status_code, replay.json()) == (201, device)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert send_point(anonymous, replay.json()).status_code == 202  # the replayed credential is the real one


def _delete_in_admin(device_id: str, outcome: dict) -> None:
    """What a superuser does in the admin, committed (own thread, own connection, outside the test's transaction)."""
    try:
        client = Client()
        client.force_login(user_create(superuser=True))
        outcome["confirm"] = client.get(f"/admin/devices/device/{device_id}/delete/").status_code
        outcome["delete"] = client.post(f"/admin/devices/device/{device_id}/delete/", {"post": "yes"}).status_code
    finally:
        connection.close()


def test_a_device_deleted_in_the_admin_is_refused_and_gone_at_once(api, anonymous):
    device = register_device(api, "SN-DEL")
    # Both servers' caches now hold the device and its credential mapping.
    for _ in range(4):
        assert send_point(anonymous, device).status_code == 202
        assert api.get(f"/devices/{device['id']}").status_code == 200

    outcome = {}
    deleter = threading.Thread(target=_delete_in_admin, args=(device["id"], outcome))
    deleter.start()
    deleter.join(30)
    assert outcome == {"confirm": 200, "delete": 302}

    # At once, on every server process (the client spreads requests over both).
    for _ in range(4):
        refused = send_point(anonymous, device)
        assert refused.status_code == 401, refused.text
        assert api.get(f"/devices/{device['id']}").status_code == 404
