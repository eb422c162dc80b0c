"""The one error mapping: outages are 503 + Retry-After, refusals carry their code and headers."""

import pytest
import redis
from rest_framework import status

from iot.api.exceptions import api_exception_handler
from iot.errors import ServiceError


@pytest.mark.parametrize(
    "error",
    [
        redis.ConnectionError("refused"),
        redis.TimeoutError("timeout"),
        redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    ],
)
def test_redis_outages_and_refusals_to_write_are_503_with_retry_after(error):
    response = api_exception_handler(error, {})
    assert response is not None and response.status_code == status.HTTP_503_SERVICE_UNAVAILABLE
    assert response["Retry-After"] == "1"


class BatchTooBig(ServiceError):
    status_code = 429
    code = "batch_exceeds_limit"


class AlreadyOpen(ServiceError):
    status_code = 409
    default_detail = "Already open."


class UnknownThing(ServiceError):
    status_code = 422
    field = "thing_id"


def test_a_service_refusal_carries_its_status_code_fields_and_headers():
    refusal = BatchTooBig("Too big.", headers={"X-RateLimit-Limit": "100"}, limit=100)
    response = api_exception_handler(refusal, {})
    assert response.status_code == 429
    assert response.data == {"detail": "Too big.", "code": "batch_exceeds_limit", "limit": 100}
    assert response["X-RateLimit-Limit"] == "100" and "Retry-After" not in response


def test_a_refusal_without_a_code_is_its_detail_alone_and_a_field_refusal_is_a_validation_error():
    response = api_exception_handler(AlreadyOpen(), {})
    assert (response.status_code, response.data) == (409, {"detail": "Already open."})
    response = api_exception_handler(UnknownThing("No thing with id 7."), {})
    assert (response.status_code, response.data) == (422, {"thing_id": ["No thing with id 7."]})
