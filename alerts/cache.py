"""The rules cache: the enabled rules of a scope (`device:<id>`, `group:<g>`), in Redis.

Built on the version-guarded cache of `iot.cache` (same entry format, same fill and
invalidation scripts); the guard is `AlertRuleScope.version`, bumped in the
transaction of every rule write. Ingestion reads a device's two scopes in ONE
round trip (`rules_cache_get_many`, one script): with no rule anywhere that is all
an evaluation costs, because an empty scope is cached too (`{}`), not just absent.

An entry's payload is the scope's enabled rules grouped by metric, what the
evaluation loop needs and nothing else:
`{"<metric>": [["<rule id>", "<operator>", <threshold>, "<severity>", <has channels>], ...]}`.
"""

from iot.cache import CacheLookup, versioned_cache_get_many, versioned_cache_invalidate_with_commit
from iot.redis import redis_tagged_key


def rules_cache_key(scope: str) -> str:
    # One Redis Cluster hash tag for all scopes, so a device's two are still one script call there.
    return redis_tagged_key("cache:alert-rules", scope)


def rules_cache_get_many(*, keys: list[str]) -> list[CacheLookup]:
    """One round trip: for each key, its payload or the moment (Redis time) and epoch of the miss."""
    return versioned_cache_get_many(keys=keys)


def rules_cache_invalidate(*, scope: str, version: int) -> None:
    """Tombstone the scope's entry now and, inside a transaction, again after commit (as `devices.cache`)."""
    versioned_cache_invalidate_with_commit(key=rules_cache_key(scope), version=version)
