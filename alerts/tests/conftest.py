"""Fixtures of the alerts tests."""

import pytest


@pytest.fixture(autouse=True)
def _own_redis_namespace(redis_namespace):
    """Each test caches rules under a Redis prefix of its own: a flushed database restarts the scope
    versions at 0, and a group scope's entry left by an earlier test (at a higher version) would
    otherwise be served, and refuse this test's fills."""
    return redis_namespace
