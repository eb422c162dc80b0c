"""The one error mapping: outages are 503 + Retry-After, refusals carry their code and headers."""

import pytest
import redis
from rest_framework import status

from iot.api.exceptions import Refusal, api_exception_handler


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


def test_a_refusal_carries_its_code_fields_and_headers():
    refusal = Refusal(
        "Too big.", status_code=429, code="batch_exceeds_limit", headers={"X-RateLimit-Limit": "100"}, limit=100
    )
    response = api_exception_handler(refusal, {})
    assert response.status_code == 429
    assert response.data == {"detail": "Too big.", "code": "batch_exceeds_limit", "limit": 100}
    assert response["X-RateLimit-Limit"] == "100" and "Retry-After" not in response
