"""An ingestion request's parsed body is freed as soon as the request no longer needs it.

DRF's Request sits in reference cycles, so a body it kept waited for a full garbage collection,
hundreds of requests later: under 1000-point batches that was ~50 MiB per web process (issue 12,
`bench/web_rss.py`). These tests run requests with the cyclic collector off, so whatever is still
referenced afterwards would have waited for it, and check that nothing but the test holds the body.
In process (`APIClient`); the memory itself is measured by the bench.
"""

import gc
import types
import uuid

import pytest
from rest_framework.test import APIClient

from devices.testing import device_create
from iot.api.parsers import StrictJSONParser
from iot.testing.factories import user_create
from iot.testing.telemetry import batch_body

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(settings, redis_namespace) -> APIClient:
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 10_000  # 1000-point batches, a few per device
    client = APIClient()
    client.force_authenticate(user_create())
    return client


@pytest.fixture
def device_id() -> str:
    return str(device_create(serial_prefix="SN-MEM").device.id)


@pytest.fixture
def parsed(monkeypatch) -> list:
    """Every body the JSON parser returns during the test, in order."""
    bodies: list = []
    parse = StrictJSONParser.parse

    def spy(self, stream, media_type=None, parser_context=None):
        body = parse(self, stream, media_type, parser_context)
        bodies.append(body)
        return body

    monkeypatch.setattr(StrictJSONParser, "parse", spy)
    return bodies


@pytest.fixture(autouse=True)
def no_cyclic_collector():
    """What is freed while a test runs is freed by reference counting alone."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def holders(bodies: list, index: int = 0) -> list[str]:
    """The objects, besides the test's list, that still reference body `index`: none once it is freed."""
    return [
        type(referrer).__name__
        for referrer in gc.get_referrers(bodies[index])
        if referrer is not bodies and not isinstance(referrer, types.FrameType)
    ]


def post(client: APIClient, body: dict, **headers):
    return client.post("/telemetry/batch", body, format="json", **headers)


def test_an_accepted_batch_holds_its_parsed_body_no_longer_than_the_request(client, device_id, parsed):
    response = post(client, batch_body(device_id, 1000))
    assert response.status_code == 202, response.content[:300]
    assert response.json()["count"] == 1000
    assert len(parsed) == 1 and len(parsed[0]["points"]) == 1000
    assert holders(parsed) == []


def test_a_refused_batch_frees_its_parsed_body_too(client, device_id, parsed):
    body = batch_body(device_id, 1000)
    body["points"][500]["metric"] = "not a metric!"
    response = post(client, body)
    assert response.status_code == 400
    assert "points[500].metric" in response.json()
    assert holders(parsed) == []


def test_a_batch_for_an_unknown_device_frees_its_parsed_body(client, parsed):
    response = post(client, batch_body(str(uuid.uuid4()), 100))
    assert response.status_code == 422, response.content[:300]
    assert holders(parsed) == []


def test_an_idempotency_key_still_tells_a_replay_from_another_body(client, device_id, parsed):
    """The body is dropped once its fingerprint is taken: a replay and a reuse are still told apart."""
    key = {"HTTP_IDEMPOTENCY_KEY": f"mem-{uuid.uuid4().hex}"}
    body = batch_body(device_id, 1000)
    first = post(client, body, **key)
    assert first.status_code == 202, first.content[:300]
    replay = post(client, body, **key)
    assert (replay.status_code, replay.json()) == (202, first.json())
    assert replay["Idempotent-Replayed"] == "true"
    other = post(client, batch_body(device_id, 10), **key)
    assert other.status_code == 422
    assert [holders(parsed, index) for index in range(3)] == [[], [], []]
