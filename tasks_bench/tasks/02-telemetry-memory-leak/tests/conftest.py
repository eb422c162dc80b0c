"""The grader's live platform and how its web server's memory is read. Fixtures only.

A platform of the grader's own (web x2 + worker, no MQTT) with the rate limits and queue thresholds out
of the way (the graders send hundreds of thousands of points), in a Redis namespace inside the run's
`REDIS_KEY_PREFIX`.
"""

import psutil
import pytest
from django.conf import settings

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.redis import redis_prefix_new


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    env = {**UNLIMITED, "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "grader")}
    with dedicated_platform(django_db_blocker, platform_logs, name="grader", env=env) as running:
        yield running


@pytest.fixture(scope="session")
def web_memory(platform):
    """A function: the resident memory (bytes) of the web server, every process of it summed, as an
    operator's `ps` sees it (the server's own code is not asked)."""
    web = next(managed for managed in platform.processes if managed.name == "web")

    def resident_bytes() -> int:
        root = psutil.Process(web.process.pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    return resident_bytes
