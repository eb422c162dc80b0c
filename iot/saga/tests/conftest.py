"""Fixtures of the saga tests: millisecond backoffs, the test sagas and their effects table, and no Celery."""

import pytest

from iot.saga.testing import saga_queue_capture


@pytest.fixture(autouse=True)
def _fast_retries(settings):
    settings.SAGA_RETRY_BASE_SECONDS = 0.002
    settings.SAGA_RETRY_MAX_SECONDS = 0.01


@pytest.fixture
def effects_table(django_db_blocker):
    from iot.saga.tests.sagas import effects_table_create

    with django_db_blocker.unblock():
        effects_table_create()


@pytest.fixture(autouse=True)
def queued():
    """The `saga_advance` tasks the code under test queued (after commit), as (run id, countdown)."""
    with saga_queue_capture() as captured:
        yield captured
