"""The cached operator-token authentication: fast path from Redis, revocation is immediate."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework import exceptions
from rest_framework.authtoken.models import Token

from iot.api.authentication import CachedTokenAuthentication, _token_cache_key
from iot.cache import timed_cache_get
from iot.testing.factories import operator_token_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def token():
    return operator_token_create(username="cached-operator", staff=True)


def authenticate(key):
    return CachedTokenAuthentication().authenticate_credentials(key)


def test_second_lookup_is_served_from_redis_without_sql(token, django_assert_num_queries):
    user, _ = authenticate(token.key)
    assert timed_cache_get(key=_token_cache_key(token.key)).hit
    with django_assert_num_queries(0):
        cached_user, key = authenticate(token.key)
    assert (cached_user.pk, cached_user.username, cached_user.is_staff) == (user.pk, user.username, True)
    assert key == token.key
    assert cached_user.is_authenticated


def test_deleted_token_is_refused_at_once(token):
    key = token.key
    authenticate(key)
    token.delete()
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate(key)


def test_deactivated_user_is_refused_at_once(token):
    authenticate(token.key)
    user = token.user
    user.is_active = False
    user.save()
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate(token.key)


def test_deleted_user_is_refused_at_once(token):
    authenticate(token.key)
    token.user.delete()
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate(token.key)


def test_unknown_token_is_refused_and_not_cached():
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate("0" * 40)
    assert not timed_cache_get(key=_token_cache_key("0" * 40)).hit


def test_cache_keys_do_not_contain_the_token(token):
    assert token.key not in _token_cache_key(token.key)


# --- Revocations that must hold (Redis failing, concurrent token creation) -------------------


def test_a_revocation_redis_cannot_record_fails_and_changes_nothing(token, monkeypatch):
    """A Redis write pause (a failover) during the delete: the delete fails loudly and rolls back,
    rather than committing while the cached token keeps working."""
    import redis
    from django.db import transaction

    from iot.api import authentication

    key = token.key
    authenticate(key)  # cached

    def paused(**kwargs):
        raise redis.TimeoutError("Timeout writing to socket")

    monkeypatch.setattr(authentication, "timed_cache_hold", paused)
    monkeypatch.setattr(authentication, "timed_cache_invalidate", paused)
    with pytest.raises(redis.TimeoutError), transaction.atomic():
        Token.objects.get(key=key).delete()
    assert Token.objects.filter(key=key).exists(), "revocation committed although Redis was never told"


def test_a_failed_invalidation_after_commit_still_refuses_the_token(token, monkeypatch):
    """The hold taken inside the transaction keeps the cache out of the way even if every
    after-commit attempt fails."""
    import redis

    from iot.api import authentication

    key = token.key
    authenticate(key)

    def paused(**kwargs):
        raise redis.TimeoutError("Timeout writing to socket")

    monkeypatch.setattr(authentication, "timed_cache_invalidate", paused)
    monkeypatch.setattr(authentication, "_INVALIDATE_ATTEMPTS", (0.0, 0.0))
    token.delete()
    assert not Token.objects.filter(key=key).exists()
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate(key)


def test_a_token_created_while_its_user_is_being_deactivated_is_refused_after_the_commit():
    """Tokens are looked up after the deactivation commits, so one created meanwhile is covered."""
    import threading

    from django.db import connection, transaction

    user_id = get_user_model().objects.create(username="being-deactivated").pk  # no token yet
    in_transaction, may_commit = threading.Event(), threading.Event()
    failures = []

    def deactivate():
        try:
            with transaction.atomic():
                user = get_user_model().objects.get(pk=user_id)
                user.is_active = False
                user.save()  # the tokens of the user are listed here (and held)
                in_transaction.set()
                assert may_commit.wait(30)
        except Exception as exc:  # reported to the test thread
            failures.append(exc)
        finally:
            connection.close()

    worker = threading.Thread(target=deactivate)
    worker.start()
    try:
        _create_and_use_a_token_meanwhile(user_id, in_transaction)
    finally:
        may_commit.set()
        worker.join(30)
    assert not failures, failures
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate("f" * 40)


def _create_and_use_a_token_meanwhile(user_id, in_transaction):
    assert in_transaction.wait(30)
    # Meanwhile: a new token for the same user is created, committed, and used (cached as active).
    late = Token.objects.create(key="f" * 40, user_id=user_id)
    late_user, _ = authenticate(late.key)
    assert late_user.is_active
