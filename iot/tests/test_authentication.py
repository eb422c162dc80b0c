"""The cached operator-token authentication: fast path from Redis, revocation is immediate."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework import exceptions
from rest_framework.authtoken.models import Token

from iot.api.authentication import CachedTokenAuthentication, _token_cache_key
from iot.cache import timed_cache_get

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def token():
    user = get_user_model().objects.create(username="cached-operator", is_staff=True)
    return Token.objects.create(user=user)


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
