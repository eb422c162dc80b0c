"""Exactly-once request handling keyed by `Idempotency-Key`, enforced by Postgres.

How concurrency is settled (no polling, no application locks):
the handler runs in one transaction that first does
`INSERT ... ON CONFLICT (scope, key) DO UPDATE ... WHERE expired`. The first
request inserts the row and holds it (uncommitted) while it works. Any
concurrent request with the same key blocks *inside Postgres* on that
uncommitted row; when the first commits, the blocked INSERT finds the
conflict and the request replays the stored response; if the first rolled
back (error, crash, dropped connection), the blocked INSERT succeeds and that
request does the work instead. `lock_timeout` bounds the wait: still in flight
after `IDEMPOTENCY_WAIT_SECONDS` means `409`.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg.errors
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from iot.idempotency.models import IdempotencyKey


class IdempotencyKeyInFlight(Exception):
    """Another request with this key is still running after the bounded wait."""


class IdempotencyKeyReused(Exception):
    """The key was first used with a different request body."""


@dataclass(frozen=True)
class IdempotentOutcome:
    status: int
    body: Any
    replayed: bool


def request_fingerprint(*, payload: Any) -> str:
    """A stable hash of a parsed JSON body (key order and spacing don't matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


_CLAIM_SQL = f"""
INSERT INTO {IdempotencyKey._meta.db_table} AS k
    (scope, key, request_fingerprint, created_at, expires_at)
VALUES (%s, %s, %s, now(), now() + make_interval(secs => %s))
ON CONFLICT (scope, key) DO UPDATE
    SET request_fingerprint = EXCLUDED.request_fingerprint,
        response_status = NULL, response_body = NULL,
        created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
    WHERE k.expires_at <= now()
RETURNING id
"""


def idempotent_execute(
    *, scope: str, key: str, fingerprint: str, handler: Callable[[], tuple[int, Any]]
) -> IdempotentOutcome:
    """Run `handler` at most once per (scope, key); later calls replay its (status, body).

    `handler` runs inside this function's transaction, so its database writes
    commit together with the stored response, or not at all.
    """
    wait_ms = max(1, int(settings.IDEMPOTENCY_WAIT_SECONDS * 1000))
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{wait_ms}ms"])
            try:
                with transaction.atomic():
                    cursor.execute(_CLAIM_SQL, [scope, key, fingerprint, settings.IDEMPOTENCY_KEY_TTL_SECONDS])
            except OperationalError as exc:
                if isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
                    raise IdempotencyKeyInFlight(key) from exc
                raise
            claimed = cursor.fetchone()
            # The wait is over; the handler's own statements get the server default back.
            cursor.execute("SELECT set_config('lock_timeout', '0', true)")

        if claimed is None:
            stored = IdempotencyKey.objects.get(scope=scope, key=key)
            if stored.request_fingerprint != fingerprint:
                raise IdempotencyKeyReused(key)
            return IdempotentOutcome(status=stored.response_status, body=stored.response_body, replayed=True)

        status, body = handler()
        IdempotencyKey.objects.filter(pk=claimed[0]).update(response_status=status, response_body=body)
        return IdempotentOutcome(status=status, body=body, replayed=False)


def idempotency_keys_delete_expired(*, now=None, batch_size: int = 5000) -> int:
    """Delete expired keys in bounded batches; returns how many were deleted."""
    now = now or timezone.now()
    deleted_total = 0
    while True:
        ids = list(IdempotencyKey.objects.filter(expires_at__lte=now).values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted_total
        deleted, _ = IdempotencyKey.objects.filter(pk__in=ids, expires_at__lte=now).delete()
        deleted_total += deleted
