"""The process-wide Redis client, key naming, and what keeps the code Redis Cluster-ready.

One connection pool per process (redis-py is thread-safe); every key the
platform writes goes through `redis_key` so it carries `REDIS_KEY_PREFIX`.

**Redis Cluster.** With `REDIS_CLUSTER=1` the client is redis-py's `RedisCluster`
(`REDIS_URL` names any node; the rest are discovered). A cluster refuses a script,
a MULTI or an MGET whose keys hash to different slots (`CROSSSLOT`), so every key
one script or transaction touches together is named with `redis_tagged_key`: only
the `{tag}` part is hashed, so the keys of one tag share a slot, and one node. The
tags in use, and what each costs (docs/SCALING.md): `{events}` (the queue's stream,
depth, reservations and dead letters, and every rate-limit key: `iot.admission` takes a
device's window, the global second and the queue's room in one script; an exact global
limit lives in one place anyway), `{breaker}`, `{cache:alert-rules}` (a device's two
rule scopes in one call), and `{telemetry:messages:<minute>}` (a minute's counters and
its seconds, one MULTI).
Single-key entries (device and token caches, heartbeats) stay untagged and spread
over the slots; the multi-key cache calls split their keys per slot in cluster
mode (`redis_slot_groups`). `iot/tests/test_redis_cluster_slots.py` runs every
script and checks each call's keys share a slot.

The Channels layer and the Celery broker do not speak Cluster (channels_redis
shards over a list of plain servers itself; kombu's Redis transport needs one
server): settings refuse `REDIS_CLUSTER` unless both point elsewhere.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import redis
from django.conf import settings
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError


def get_redis() -> redis.Redis | RedisCluster:
    """The shared client for this process (bytes in, bytes out): a `RedisCluster` if `REDIS_CLUSTER`."""
    return _client(settings.REDIS_URL, settings.REDIS_CLUSTER)


@cache
def _client(url: str, cluster: bool) -> redis.Redis | RedisCluster:
    options = {
        "max_connections": settings.REDIS_MAX_CONNECTIONS,
        "socket_timeout": settings.REDIS_SOCKET_TIMEOUT,
        "socket_connect_timeout": settings.REDIS_SOCKET_TIMEOUT,
        "health_check_interval": 30,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def redis_key(*parts: object) -> str:
    """`<prefix>:<part>:<part>...`, the one place keys are named."""
    return ":".join([settings.REDIS_KEY_PREFIX, *map(str, parts)])


def redis_tagged_key(tag: str, *parts: object) -> str:
    """`<prefix>:{<tag>}:<part>...`: Redis Cluster hashes only `tag`, so every key named with the same
    tag lands in one hash slot, and a script or MULTI may use them together.

    The prefix can't contain braces (refused in settings), so the tag is always the first `{...}`.
    """
    if not tag or "{" in tag or "}" in tag:
        raise ValueError(f"a hash tag is a non-empty string without braces, got {tag!r}")
    return redis_key(f"{{{tag}}}", *parts)


def redis_key_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of `key` (CRC16 of its tag, or of the whole key, mod 16384)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def redis_slot_groups(keys: Sequence[str], *, by_slot: bool | None = None) -> list[list[int]]:
    """Indexes into `keys`, grouped so each group's keys may go to one script call: per hash slot
    under Redis Cluster (`by_slot`, default `REDIS_CLUSTER`), else all in one group (one server takes
    any keys together)."""
    if not keys:
        return []
    if not (settings.REDIS_CLUSTER if by_slot is None else by_slot):
        return [list(range(len(keys)))]
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(redis_key_slot(key), []).append(index)
    return list(groups.values())


class RedisScript:
    """A Lua script run with EVALSHA (loaded on a server's first NOSCRIPT), on `client` or this
    process's client at call time, so the same script objects run on a cluster client too."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, *, keys: Sequence = (), args: Sequence = (), client=None):
        client = get_redis() if client is None else client
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


_scripts: list[RedisScript] = []


def register_script(source: str) -> RedisScript:
    """A Lua script of the platform's (EVALSHA, loaded on first use); listed by `registered_scripts`."""
    script = RedisScript(source)
    _scripts.append(script)
    return script


def registered_scripts() -> list[RedisScript]:
    """Every script registered so far in this process (the cluster-slot test checks it ran each one)."""
    return list(_scripts)


@dataclass(frozen=True)
class ScriptCall:
    """One call of a registered script, to run later, e.g. with others in one round trip (`redis_script_calls`)."""

    script: RedisScript
    keys: Sequence = ()
    args: Sequence = ()


def redis_script_calls(calls: Sequence[ScriptCall], *, client=None) -> list:
    """Run several script calls in one round trip: a pipeline, not a transaction (each script is
    atomic by itself, the calls are not atomic together; under Redis Cluster each may go to its
    own slot, and they go one after the other: redis-py's cluster pipeline refuses scripts). Returns
    each call's result, or the exception that call raised, in order; a
    connection error raises for all.

    For a request's independent writes after its commit (telemetry's publish and the device's
    cache tombstone): one round trip instead of one each.
    """
    client = get_redis() if client is None else client
    if isinstance(client, RedisCluster):
        # redis-py's cluster pipeline refuses scripts (EVALSHA "is blocked when running redis in cluster
        # mode"): one call after the other, results and exceptions as a pipeline would give them.
        return [_call_or_error(call, client) for call in calls]

    def run(batch: Sequence[ScriptCall]) -> list:
        pipe = client.pipeline(transaction=False)
        for call in batch:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        return pipe.execute(raise_on_error=False)

    results = run(calls)
    missing = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:  # a server that has not seen these scripts yet (restarted, new): they did not run
        for source in {calls[index].script.source for index in missing}:
            client.script_load(source)
        for index, result in zip(missing, run([calls[index] for index in missing]), strict=True):
            results[index] = result
    return results


def _call_or_error(call: ScriptCall, client) -> object:
    try:
        return call.script(keys=call.keys, args=call.args, client=client)
    except redis.ResponseError as exc:  # what a pipeline with raise_on_error=False would hand back
        return exc
