"""A 401 says which credentials to send, also for a scheme the API doesn't know (`Bearer`, `Basic`)."""

import uuid

import pytest

pytestmark = pytest.mark.django_db

POINT = {"device_id": str(uuid.uuid4()), "timestamp": "2024-01-01T00:00:00Z", "metric": "t", "value": 1}


@pytest.mark.parametrize("header", ["Bearer abc.def.ghi", "Basic YWxpY2U6c2VjcmV0", "bearer x"])
def test_an_unknown_scheme_is_named_with_the_ones_accepted(client, header):
    response = client.get("/devices", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    scheme = header.split()[0]
    assert response.json() == {"detail": f"Unsupported authorization scheme '{scheme}'; use 'Token <key>'."}
    assert response["WWW-Authenticate"] == "Token"


def test_where_devices_are_let_in_both_schemes_are_named(client):
    response = client.post("/telemetry/point", POINT, content_type="application/json", HTTP_AUTHORIZATION="Bearer x")
    assert response.status_code == 401
    assert response.json()["detail"] == (
        "Unsupported authorization scheme 'Bearer'; use 'Token <key>' (operators) or 'Device <token>' (devices)."
    )
    assert response["WWW-Authenticate"] == "Token"
    # Nothing was looked at beyond the header: a malformed body is not what the answer is about.
    assert client.post("/telemetry/point", "{", content_type="application/json").status_code == 401


def test_no_credentials_at_all_says_what_to_send(client):
    response = client.get(f"/telemetry/{uuid.uuid4()}")
    assert response.status_code == 401
    assert "not provided" in response.json()["detail"]
    assert "'Token <key>' (operators) or 'Device <token>' (devices)" in response.json()["detail"]
    assert response["WWW-Authenticate"] == "Token"


def test_a_known_scheme_with_a_bad_credential_keeps_its_own_answer(client):
    response = client.get("/devices", HTTP_AUTHORIZATION="Token not-a-token")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid token."}


def test_public_endpoints_ignore_an_unknown_scheme(client):
    assert client.get("/api/schema", HTTP_AUTHORIZATION="Bearer x").status_code == 200
    assert client.get("/health/live", HTTP_AUTHORIZATION="Bearer x").status_code == 200
