"""Operator token authentication with a Redis cache in front of the token table.

DRF's `TokenAuthentication` costs an ORM query (~1.5 ms of CPU) on every request,
the largest single cost of a telemetry request. Here a token resolves from Redis
(`iot.cache` time-versioned entries) and only a miss reads Postgres. A change
that can revoke access (token deleted, user saved - e.g. deactivated - or
deleted) invalidates the entry after commit, and the cache's fill guard refuses
any entry whose database read began before that invalidation, so a revoked
token stops working as soon as the change has committed.

Cache keys hash the token: the Redis keyspace never holds a usable credential.
"""

import hashlib

import orjson
from django.contrib.auth import get_user_model
from django.db import transaction
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token

from iot.cache import timed_cache_fill, timed_cache_get, timed_cache_invalidate
from iot.redis import redis_key

TOKEN_CACHE_TTL_SECONDS = 300
_USER_FIELDS = ("id", "username", "is_active", "is_staff", "is_superuser")


def _token_cache_key(token_key: str) -> str:
    return redis_key("cache", "api-token", hashlib.sha256(token_key.encode()).hexdigest())


def api_tokens_invalidate(*, token_keys: list[str]) -> None:
    """Forget cached tokens once the current transaction commits (immediately outside one)."""

    def invalidate():
        for token_key in token_keys:
            timed_cache_invalidate(key=_token_cache_key(token_key))

    transaction.on_commit(invalidate, robust=True)


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
                ttl_seconds=TOKEN_CACHE_TTL_SECONDS,
            )
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return user, key


def _on_token_deleted(sender, instance, **kwargs):
    api_tokens_invalidate(token_keys=[instance.key])


def _on_user_changed(sender, instance, **kwargs):
    # Deactivation or a change of staff flags must not be served from the cache.
    api_tokens_invalidate(token_keys=list(Token.objects.filter(user_id=instance.pk).values_list("key", flat=True)))


def connect_token_cache_invalidation() -> None:
    """Wire invalidation to the only ways a token's access changes (called from `IotConfig.ready`)."""
    from django.db.models.signals import post_delete, post_save

    post_delete.connect(_on_token_deleted, sender=Token, dispatch_uid="iot-token-cache-token-deleted")
    post_save.connect(_on_user_changed, sender=get_user_model(), dispatch_uid="iot-token-cache-user-saved")
