"""The grader's live platform: what `api` (the root conftest's operator client) talks to. Fixtures only.

A platform of the grader's own (web x2 + worker, no MQTT), in a Redis namespace inside the run's
`REDIS_KEY_PREFIX`. Its message-count reconciliation runs every second (production: every 30 s), and
the fixture returns once it has run: until then, reading message counts covers the whole retention of
the per-minute counters (2 days of minutes, tens of ms per read), which would decide the timings.
"""

import re

import pytest
from django.conf import settings

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.processes import wait_until
from iot.testing.redis import redis_prefix_new

RECONCILED = re.compile(r"telemetry_message_counts_reconciliation\[[^\]]*\] succeeded")


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    env = {
        **UNLIMITED,
        "TELEMETRY_COUNT_RECONCILE_INTERVAL_SECONDS": "1",
        "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "grader"),
    }
    with dedicated_platform(django_db_blocker, platform_logs, name="grader", env=env) as running:
        worker = running.processes[-1]
        wait_until(
            lambda: RECONCILED.search(worker.log_tail(1_000_000)),
            timeout=60,
            interval=0.2,
            message="the worker's first message-count reconciliation",
        )
        yield running
