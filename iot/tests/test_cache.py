"""The version-guarded cache against real Redis, including the race plain cache-aside loses."""

import time
import uuid

import pytest
from django.test import override_settings

from iot.cache import versioned_cache_fill, versioned_cache_get, versioned_cache_invalidate
from iot.redis import get_redis, redis_key


@pytest.fixture
def key():
    return redis_key("test-cache", uuid.uuid4().hex)


def fill(key, version, payload, lookup):
    return versioned_cache_fill(key=key, version=version, payload=payload, lookup=lookup, ttl_seconds=60)


def test_miss_then_fill_then_hit(key):
    miss = versioned_cache_get(key=key)
    assert not miss.hit and miss.read_started_ms > 0
    assert fill(key, 1, b"v1", miss)
    assert versioned_cache_get(key=key).payload == b"v1"


def test_reader_that_read_before_a_write_cannot_refill_old_data(key):
    """The stale-fill race: read v1 from the DB, a write commits v2 and invalidates, then the fill."""
    assert fill(key, 1, b"v1", versioned_cache_get(key=key))
    slow_reader = versioned_cache_get(key=key)  # hit, but a reader that missed would look like:
    assert slow_reader.hit
    versioned_cache_invalidate(key=key, version=2)  # writer: UPDATE ... version=2, then invalidate
    late_miss = versioned_cache_get(key=key)
    assert not late_miss.hit
    # The reader that fetched version 1 before the write now tries to store it: refused.
    assert not fill(key, 1, b"v1", late_miss)
    assert not versioned_cache_get(key=key).hit
    # A reader that fetched version 2 fills normally.
    assert fill(key, 2, b"v2", late_miss)
    assert versioned_cache_get(key=key).payload == b"v2"


def test_older_fill_never_overwrites_newer_payload(key):
    started = versioned_cache_get(key=key)
    assert fill(key, 5, b"v5", started)
    assert not fill(key, 4, b"v4", started)
    assert versioned_cache_get(key=key).payload == b"v5"


def test_invalidate_never_lowers_the_known_version(key):
    started = versioned_cache_get(key=key)
    assert fill(key, 7, b"v7", started)
    versioned_cache_invalidate(key=key, version=3)  # a late, older invalidation is a no-op
    assert versioned_cache_get(key=key).payload == b"v7"


@override_settings(CACHE_FILL_MAX_AGE_MS=50)
def test_fill_from_a_stale_read_is_refused_even_after_the_tombstone_expired(key):
    started = versioned_cache_get(key=key)
    time.sleep(0.1)  # the reader stalled between its database read and its fill (not a timing assert)
    assert not fill(key, 1, b"v1", started)
    assert not versioned_cache_get(key=key).hit


def test_tombstone_outlives_the_fill_window(key):
    from django.conf import settings

    versioned_cache_invalidate(key=key, version=2)
    # Longer than any fill may be late, so no late fill can find the tombstone gone.
    assert get_redis().pttl(key) > 2 * settings.CACHE_FILL_MAX_AGE_MS


def test_timed_cache_refuses_a_fill_whose_read_started_before_an_invalidation(key):
    from iot.cache import timed_cache_fill, timed_cache_get, timed_cache_invalidate

    early = timed_cache_get(key=key)  # a reader misses, then reads the (old) row
    timed_cache_invalidate(key=key)  # meanwhile the row changed and committed
    assert not timed_cache_fill(key=key, payload=b"old", lookup=early, ttl_seconds=60)
    assert not timed_cache_get(key=key).hit
    from iot.testing.processes import wait_until

    # A reader that started after the change (a later millisecond than the invalidation) fills.
    wait_until(
        lambda: timed_cache_fill(key=key, payload=b"new", lookup=timed_cache_get(key=key), ttl_seconds=60),
        timeout=5,
        message="a fill from a read that began after the invalidation",
    )
    assert timed_cache_get(key=key).payload == b"new"


# --- Epochs: what a Redis restart or failover brings back must not be served -----------------


def test_an_entry_written_by_an_earlier_server_is_not_served(key):
    """An entry restored from disk (or a replica) whose tombstone was lost: another epoch, ignored."""
    get_redis().hset(key, mapping={"v": 1, "d": b"stale", "e": "0" * 40})
    assert not versioned_cache_get(key=key).hit


def test_a_tombstone_of_an_earlier_server_does_not_block_a_fresh_fill(key):
    get_redis().hset(key, mapping={"v": 99, "e": "0" * 40})
    assert fill(key, 1, b"v1", versioned_cache_get(key=key))
    assert versioned_cache_get(key=key).payload == b"v1"


def test_a_fill_whose_miss_an_earlier_server_saw_is_refused(key):
    """The miss (and the database read after it) happened before the restart: it may predate
    an invalidation the restarted server never heard of."""
    from dataclasses import replace

    miss = versioned_cache_get(key=key)
    assert miss.epoch
    assert not fill(key, 1, b"v1", replace(miss, epoch=b"0" * 40))
    assert not versioned_cache_get(key=key).hit


def test_a_hold_refuses_every_fill_until_the_after_commit_invalidation(key):
    from iot.cache import timed_cache_fill, timed_cache_get, timed_cache_hold, timed_cache_invalidate
    from iot.testing.processes import wait_until

    assert timed_cache_fill(key=key, payload=b"old", lookup=timed_cache_get(key=key), ttl_seconds=60)
    timed_cache_hold(key=key, ttl_ms=60_000)  # the change's transaction is open
    assert not timed_cache_get(key=key).hit
    # Any read, however recent, is refused while the change may still be uncommitted.
    assert not timed_cache_fill(key=key, payload=b"old", lookup=timed_cache_get(key=key), ttl_seconds=60)
    assert get_redis().pttl(key) > 50_000
    timed_cache_invalidate(key=key)  # committed
    wait_until(
        lambda: timed_cache_fill(key=key, payload=b"new", lookup=timed_cache_get(key=key), ttl_seconds=60),
        timeout=5,
        message="a fill after the invalidation",
    )
    assert timed_cache_get(key=key).payload == b"new"


# --- Many keys at once (set-based writes) ------------------------------------------------------


def test_invalidate_many_tombstones_every_key_like_one_at_a_time(monkeypatch):
    """Past a chunk boundary too: each key ends as `versioned_cache_invalidate` would leave it."""
    from iot import cache
    from iot.cache import versioned_cache_invalidate_many

    monkeypatch.setattr(cache, "INVALIDATE_MANY_CHUNK", 3)
    keys = [redis_key("test-cache", uuid.uuid4().hex) for _ in range(7)]
    newer = keys[0]
    assert fill(newer, 9, b"v9", versioned_cache_get(key=newer))  # knows a newer version than the write's
    for key in keys[1:]:  # version 5 cached
        assert fill(key, 5, b"v5", versioned_cache_get(key=key))
    versioned_cache_invalidate_many(versions={key: 6 for key in keys})
    assert versioned_cache_get(key=newer).payload == b"v9"  # never lowered
    for key in keys[1:]:
        miss = versioned_cache_get(key=key)
        assert not miss.hit, key
        assert not fill(key, 5, b"v5", miss), "a reader of the old version filled after the tombstone"
        assert get_redis().pttl(key) > 0
        assert fill(key, 6, b"v6", miss)
        assert versioned_cache_get(key=key).payload == b"v6"
    versioned_cache_invalidate_many(versions={})  # nothing to do, no call


def test_invalidate_many_with_commit_tombstones_again_after_commit(django_capture_on_commit_callbacks, db):
    from iot.cache import versioned_cache_invalidate_many_with_commit

    key = redis_key("test-cache", uuid.uuid4().hex)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        versioned_cache_invalidate_many_with_commit(versions={key: 3})
        assert not fill(key, 2, b"v2", versioned_cache_get(key=key))  # tombstoned inside the transaction
    assert len(callbacks) == 1
    get_redis().delete(key)  # the tombstone is gone (a long transaction outlived it)...
    assert fill(key, 2, b"v2", versioned_cache_get(key=key))  # ...and a reader of the old row filled
    callbacks[0]()  # the commit: tombstoned again
    assert not versioned_cache_get(key=key).hit
    assert not fill(key, 2, b"v2", versioned_cache_get(key=key))
