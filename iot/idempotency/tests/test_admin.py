"""The idempotency admin lists keys and statuses, never the responses they replay."""

import secrets
import uuid

import pytest

from iot.idempotency.models import IdempotencyKey
from iot.idempotency.services import idempotent_execute, request_fingerprint
from iot.testing.factories import user_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer(client):
    """A staff user who may only view idempotency keys."""
    client.force_login(user_create(staff=True, permissions=["view_idempotencykey"]))
    return client


@pytest.fixture
def stored_secret():
    secret = secrets.token_urlsafe(32)
    key = f"adm-{uuid.uuid4().hex}"
    idempotent_execute(
        scope="user:1:POST:/devices",
        key=key,
        fingerprint=request_fingerprint(payload={"serial_number": "SN-ADMIN"}),
        handler=lambda: (201, {"serial_number": "SN-ADMIN", "device_token": secret}),
    )
    return IdempotencyKey.objects.get(key=key), secret


def test_the_list_shows_the_key_and_status_but_no_body(viewer, stored_secret):
    row, secret = stored_secret
    page = viewer.get("/admin/idempotency/idempotencykey/")
    assert page.status_code == 200
    content = page.content.decode()
    assert row.key in content and "201" in content
    assert secret not in content and "device_token" not in content and "SN-ADMIN" not in content


def test_the_detail_page_shows_no_body_nor_fingerprint(viewer, stored_secret):
    row, secret = stored_secret
    page = viewer.get(f"/admin/idempotency/idempotencykey/{row.pk}/change/")
    assert page.status_code == 200
    content = page.content.decode()
    assert row.key in content and row.scope in content
    assert secret not in content and "device_token" not in content and "SN-ADMIN" not in content
    assert "response_body" not in content and row.request_fingerprint not in content
