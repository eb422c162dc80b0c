"""Operator token authentication with a Redis cache in front of the token table.

DRF's `TokenAuthentication` costs an ORM query (~1.5 ms of CPU) on every request,
the largest single cost of a telemetry request. Here a token resolves from Redis
(`iot.cache` time-versioned entries) and only a miss reads Postgres.

A change that can revoke access (token deleted, user saved - e.g. deactivated -
or deleted) must take effect everywhere or fail loudly:

* inside the change's transaction, each affected token's entry is replaced by a
  hold that refuses every fill (`timed_cache_hold`); if Redis can't be told, the
  change raises and rolls back instead of committing while the token stays
  cached (a Redis write pause during a failover used to leave a deleted token
  working for 284 more seconds);
* after the commit, the tokens are looked up again and invalidated (retried a
  few times): a token created while the user was being deactivated is found
  then, and the cache's fill guard refuses any entry whose database read began
  before that invalidation. Should that step fail every retry, the holds still
  keep the cache out of the way until they expire (`TOKEN_CACHE_TTL_SECONDS`):
  the tokens are read from Postgres meanwhile, never served stale.

Cache keys hash the token: the Redis keyspace never holds a usable credential.
"""

import hashlib
import logging
import time

import orjson
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token

from iot.cache import timed_cache_fill, timed_cache_get, timed_cache_hold, timed_cache_invalidate
from iot.redis import redis_key

logger = logging.getLogger(__name__)

_USER_FIELDS = ("id", "username", "is_active", "is_staff", "is_superuser")
_INVALIDATE_ATTEMPTS = (0.0, 0.05, 0.25)  # delays before each after-commit attempt


def _token_cache_key(token_key: str) -> str:
    return redis_key("cache", "api-token", hashlib.sha256(token_key.encode()).hexdigest())


def _invalidate_after_commit(token_keys) -> None:
    for delay in _INVALIDATE_ATTEMPTS:
        time.sleep(delay)
        try:
            for token_key in token_keys():
                timed_cache_invalidate(key=_token_cache_key(token_key))
            return
        except redis.RedisError as exc:
            error = exc
    logger.error(
        "token cache invalidation failed after commit (%s); the in-transaction holds keep the "
        "cache bypassed for up to %s s",
        error,
        settings.TOKEN_CACHE_TTL_SECONDS,
    )


def api_tokens_revoke_cached(*, token_keys: list[str] | None = None, user_id: int | None = None) -> None:
    """Stop serving these tokens (or every token of `user_id`) from the cache, as part of the
    current transaction: hold now (raises if Redis is unreachable), invalidate after commit."""

    def current_keys() -> list[str]:
        keys = list(token_keys or [])
        if user_id is not None:
            keys += Token.objects.filter(user_id=user_id).values_list("key", flat=True)
        return keys

    hold_ms = settings.TOKEN_CACHE_TTL_SECONDS * 1000
    for token_key in current_keys():
        timed_cache_hold(key=_token_cache_key(token_key), ttl_ms=hold_ms)
    # Looked up again after the commit: a token created meanwhile is covered too.
    transaction.on_commit(lambda: _invalidate_after_commit(current_keys))


class CachedTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, key):
        cache_key = _token_cache_key(key)
        lookup = timed_cache_get(key=cache_key)
        if lookup.hit:
            fields = orjson.loads(lookup.payload)
            user = get_user_model()(**dict(zip(_USER_FIELDS, fields, strict=True)))
            user._state.adding = False
        else:
            token = Token.objects.select_related("user").filter(key=key).first()
            if token is None:
                raise exceptions.AuthenticationFailed("Invalid token.")
            user = token.user
            timed_cache_fill(
                key=cache_key,
                payload=orjson.dumps([getattr(user, name) for name in _USER_FIELDS]),
                lookup=lookup,
                ttl_seconds=settings.TOKEN_CACHE_TTL_SECONDS,
            )
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return user, key


def _on_token_deleted(sender, instance, **kwargs):
    api_tokens_revoke_cached(token_keys=[instance.key])


def _on_user_changed(sender, instance, **kwargs):
    # Deactivation or a change of staff flags must not be served from the cache.
    api_tokens_revoke_cached(user_id=instance.pk)


def connect_token_cache_invalidation() -> None:
    """Wire invalidation to the only ways a token's access changes (called from `IotConfig.ready`)."""
    from django.db.models.signals import post_delete, post_save

    post_delete.connect(_on_token_deleted, sender=Token, dispatch_uid="iot-token-cache-token-deleted")
    post_save.connect(_on_user_changed, sender=get_user_model(), dispatch_uid="iot-token-cache-user-saved")
