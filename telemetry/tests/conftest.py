"""Fixtures of the telemetry tests: a dedicated live platform whose limits don't get in the way.

The helpers they and the tests use are in the test kit (`iot/testing/live.py`, `iot/testing/telemetry.py`,
`telemetry/testing.py`); a conftest holds fixtures only.
"""

import pytest

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.processes import http_client


@pytest.fixture(scope="module")
def bulk_platform(django_db_setup, django_db_blocker, platform_logs):
    """A live platform whose rate limits and queue thresholds don't get in the way (load tests)."""
    with dedicated_platform(django_db_blocker, platform_logs, name="bulk", env=UNLIMITED) as running:
        yield running


@pytest.fixture(scope="module")
def bulk_api(bulk_platform, operator_token):
    with http_client(bulk_platform, operator_token) as client:
        yield client
