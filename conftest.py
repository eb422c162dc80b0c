"""Suite-wide fixtures: an isolated Redis namespace, and the live multi-process platform.

`platform` starts the real ASGI server with 2 worker processes, its embedded
MQTT broker and a real worker against the test database, once per session;
tests talk to it over HTTP with `api` (an operator token) exactly as clients
do, and over MQTT at `platform.mqtt_url`.
"""

import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from iot.testing.processes import (
    Platform,
    database_url,
    http_client,
    platform_env,
    start_mqtt_broker,
    start_web,
    start_worker,
)
from iot.testing.redis import redis_namespace as redis_namespace_of
from iot.testing.redis import redis_prefix_flush, redis_prefix_new


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Give live tests the test database without moving them.

    pytest-django creates only the databases that collected tests ask for, so a
    run of live tests alone would otherwise point the servers at the main
    database. Marking them here, after pytest-django has ordered the session,
    keeps them last: after the transactional tests, whose flush empties every
    table (the session's operator token included).
    """
    for item in items:
        if item.get_closest_marker("live") and not item.get_closest_marker("django_db"):
            item.add_marker(pytest.mark.django_db)


@pytest.fixture(scope="session", autouse=True)
def _redis_namespace():
    """The session's keys start from nothing (the namespace is `REDIS_KEY_PREFIX`, e.g. one per engineer)."""
    redis_prefix_flush(settings.REDIS_KEY_PREFIX)


@pytest.fixture
def redis_namespace(settings):
    """A Redis namespace of this test's own: `REDIS_KEY_PREFIX` set to a fresh prefix under the session's for
    the test (its stream, counters, windows shared with nothing), emptied afterwards; yields the prefix."""
    with redis_namespace_of(redis_prefix_new(settings.REDIS_KEY_PREFIX, "ns")) as prefix:
        settings.REDIS_KEY_PREFIX = prefix
        yield prefix


@pytest.fixture(scope="session")
def platform_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("platform-logs")


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    """The real platform (web x2 processes, its embedded MQTT broker, the worker) on the test database."""
    with django_db_blocker.unblock():
        env = platform_env(database=database_url(connection.settings_dict), mqtt=True)
    running = Platform(env=env)
    try:
        start_web(running, workers=2, log_dir=platform_logs)
        start_mqtt_broker(running, log_dir=platform_logs)
        start_worker(running, log_dir=platform_logs)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def operator_token(django_db_setup, django_db_blocker) -> str:
    from iot.testing.factories import operator_token_create

    with django_db_blocker.unblock():
        return operator_token_create(username="operator").key


@pytest.fixture(scope="session")
def api(platform, operator_token):
    """An HTTP client for the live platform, authenticated as an operator."""
    with http_client(platform, operator_token) as client:
        yield client


@pytest.fixture(scope="session")
def anonymous(platform):
    with http_client(platform) as client:
        yield client


@pytest.fixture
def unique_id() -> str:
    return uuid.uuid4().hex[:8]
