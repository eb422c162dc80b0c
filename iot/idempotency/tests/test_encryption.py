"""Stored responses are encrypted: a replay still returns the first body, Postgres never holds it in clear.

A registration's `201` carries the device's credential, and a replay must return
it (the contract), so it is kept for the key's 24 h, encrypted (`crypto.py`).
"""

import secrets
import uuid

import pytest
from django.db import connection
from django.test import override_settings
from rest_framework.test import APIClient

from devices.models import Device
from iot.idempotency import services
from iot.idempotency.models import IdempotencyKey
from iot.idempotency.services import idempotent_execute, request_fingerprint
from iot.testing.factories import user_create

KEY_A = "a" * 16 + secrets.token_hex(16)
KEY_B = "b" * 16 + secrets.token_hex(16)


def stored_row_text(key: str) -> str:
    """Every column of the key's row, as Postgres renders it (no ORM decoding in between)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT k::text FROM {IdempotencyKey._meta.db_table} AS k WHERE key = %s", [key])
        (row,) = cursor.fetchall()
    return row[0]


def run(key, handler, body=None):
    body = body or {"x": 1}
    return idempotent_execute(
        scope="user:1:POST:/x", key=key, fingerprint=request_fingerprint(payload=body), handler=handler
    )


@pytest.mark.django_db(transaction=True)
def test_a_stored_body_is_encrypted_and_replays_in_full():
    secret = secrets.token_urlsafe(32)
    key = f"enc-{uuid.uuid4().hex}"
    first = run(key, lambda: (201, {"device_token": secret, "nested": {"n": [1, 2.5, None]}}))
    row = stored_row_text(key)
    assert key in row  # the row is there...
    assert secret not in row and "device_token" not in row  # ...without the body in clear
    replay = run(key, lambda: pytest.fail("a replay must not run the handler"))
    assert replay.replayed and (replay.status, replay.body) == (201, first.body)


@pytest.mark.django_db(transaction=True)
def test_replays_survive_a_key_rotation_while_the_old_key_is_kept():
    key = f"rot-{uuid.uuid4().hex}"
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_A, IDEMPOTENCY_ENCRYPTION_OLD_KEYS=[]):
        run(key, lambda: (201, {"gen": "A"}))
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_B, IDEMPOTENCY_ENCRYPTION_OLD_KEYS=[KEY_A]):
        assert run(key, lambda: (201, {"gen": "B"})).body == {"gen": "A"}
        # New bodies are encrypted with the new key only: they open once the old one is gone.
        run(f"{key}-new", lambda: (201, {"gen": "B"}))
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_B, IDEMPOTENCY_ENCRYPTION_OLD_KEYS=[]):
        assert run(f"{key}-new", lambda: (201, {})).body == {"gen": "B"}


@pytest.mark.django_db(transaction=True)
def test_a_body_no_configured_key_opens_is_refused_and_not_run_again():
    key = f"lost-{uuid.uuid4().hex}"
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_A):
        run(key, lambda: (202, {"status": "accepted"}))
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_B, IDEMPOTENCY_ENCRYPTION_OLD_KEYS=[]):
        with pytest.raises(services.IdempotencyReplayUnreadable):
            run(key, lambda: pytest.fail("the first request's work is committed: never run it twice"))
    # Nothing was changed by the refusal: with the right key the replay works again.
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_A):
        assert run(key, lambda: (500, {})).body == {"status": "accepted"}


@pytest.mark.django_db(transaction=True)
def test_the_default_key_follows_a_django_secret_key_rotation():
    key = f"dflt-{uuid.uuid4().hex}"
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY="", SECRET_KEY=KEY_A, SECRET_KEY_FALLBACKS=[]):
        run(key, lambda: (201, {"v": 1}))
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY="", SECRET_KEY=KEY_B, SECRET_KEY_FALLBACKS=[KEY_A]):
        assert run(key, lambda: (201, {"v": 2})).body == {"v": 1}
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY="", SECRET_KEY=KEY_B, SECRET_KEY_FALLBACKS=[]):
        with pytest.raises(services.IdempotencyReplayUnreadable):
            run(key, lambda: (201, {"v": 3}))


# --- over the API (in-process; the live test is devices/tests/test_credentials_live.py) ---


@pytest.fixture
def operator_client():
    client = APIClient()
    client.force_authenticate(user_create())
    return client


def register(client, serial, key):
    body = {"serial_number": serial, "device_type": "sensor", "firmware_version": "1.0.0"}
    return client.post("/devices", body, format="json", HTTP_IDEMPOTENCY_KEY=key)


@pytest.mark.django_db
def test_a_registration_replay_returns_the_credential_that_is_stored_encrypted(operator_client):
    serial, key = f"SN-ENC-{uuid.uuid4().hex[:8]}", f"reg-{uuid.uuid4().hex}"
    first = register(operator_client, serial, key)
    assert first.status_code == 201
    token = first.json()["device_token"]
    assert token not in stored_row_text(key)
    replay = register(operator_client, serial, key)
    assert (replay.status_code, replay.json()) == (201, first.json())
    assert replay["Idempotent-Replayed"] == "true"


@pytest.mark.django_db
def test_a_registration_replay_without_its_key_is_409_and_registers_nothing(operator_client):
    serial, key = f"SN-LOST-{uuid.uuid4().hex[:8]}", f"reg-{uuid.uuid4().hex}"
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_A):
        assert register(operator_client, serial, key).status_code == 201
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEY=KEY_B, IDEMPOTENCY_ENCRYPTION_OLD_KEYS=[]):
        replay = register(operator_client, serial, key)
    assert replay.status_code == 409
    assert "can no longer be replayed" in replay.json()["detail"]
    assert "new Idempotency-Key" in replay.json()["detail"]
    assert Device.objects.filter(serial_number=serial).count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_the_bodies_kept_in_clear_and_they_still_replay():
    """Keys stored before the deploy keep replaying; going back restores the clear column."""
    from django.db.migrations.executor import MigrationExecutor

    key = f"mig-{uuid.uuid4().hex}"
    run(key, lambda: (201, {"device_token": "before-the-deploy"}))
    before, after = [("idempotency", "0001_initial")], [("idempotency", "0002_encrypt_response_body")]
    try:
        executor = MigrationExecutor(connection)
        executor.migrate(before)
        assert "before-the-deploy" in stored_row_text(key)  # in clear, as the old code kept it
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(after)
    assert "before-the-deploy" not in stored_row_text(key)
    assert run(key, lambda: (500, {})).body == {"device_token": "before-the-deploy"}
