"""`idempotent_execute` against real Postgres, including a competing open transaction."""

import threading
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from iot.idempotency.crypto import response_body_encrypt
from iot.idempotency.models import IdempotencyKey
from iot.idempotency.services import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    idempotency_keys_delete_expired,
    idempotent_execute,
    request_fingerprint,
)
from iot.testing.processes import psycopg_conninfo

pytestmark = pytest.mark.django_db(transaction=True)


def run(key, body, handler, scope="user:1:POST:/x"):
    return idempotent_execute(scope=scope, key=key, fingerprint=request_fingerprint(payload=body), handler=handler)


def test_first_call_runs_and_repeats_replay():
    calls = []

    def handler():
        calls.append(1)
        return 201, {"n": len(calls)}

    first = run("a", {"x": 1}, handler)
    second = run("a", {"x": 1}, handler)
    assert (first.status, first.body, first.replayed) == (201, {"n": 1}, False)
    assert (second.status, second.body, second.replayed) == (201, {"n": 1}, True)
    assert calls == [1]


def test_fingerprint_ignores_key_order():
    assert request_fingerprint(payload={"a": 1, "b": 2}) == request_fingerprint(payload={"b": 2, "a": 1})


def test_same_key_different_body_is_refused():
    run("b", {"x": 1}, lambda: (201, {}))
    with pytest.raises(IdempotencyKeyReused):
        run("b", {"x": 2}, lambda: (201, {}))


def test_scopes_do_not_collide():
    run("c", {"x": 1}, lambda: (201, {"who": 1}), scope="user:1:POST:/x")
    other = run("c", {"x": 2}, lambda: (201, {"who": 2}), scope="user:2:POST:/x")
    assert other.body == {"who": 2} and not other.replayed


def test_handler_failure_releases_the_key():
    def boom():
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        run("d", {"x": 1}, boom)
    assert not IdempotencyKey.objects.filter(key="d").exists()
    assert run("d", {"x": 1}, lambda: (201, {"ok": True})).body == {"ok": True}


def test_expired_key_is_reclaimed_atomically():
    run("e", {"x": 1}, lambda: (201, {"gen": 1}))
    IdempotencyKey.objects.filter(key="e").update(expires_at=timezone.now() - timedelta(seconds=1))
    again = run("e", {"x": 2}, lambda: (201, {"gen": 2}))
    assert again.body == {"gen": 2} and not again.replayed


def test_cleanup_deletes_only_expired_keys():
    run("f1", {}, lambda: (201, {}))
    run("f2", {}, lambda: (201, {}))
    IdempotencyKey.objects.filter(key="f1").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert idempotency_keys_delete_expired() == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["f2"]


def _hold_key_in_open_transaction(scope, key, fingerprint, holding, release):
    """Another process's request: claims the key and keeps its transaction open."""
    with psycopg.connect(**psycopg_conninfo(connection.settings_dict)) as other:
        with other.transaction():
            other.execute(
                f"INSERT INTO {IdempotencyKey._meta.db_table} (scope, key, request_fingerprint, created_at, expires_at)"
                " VALUES (%s, %s, %s, now(), now() + interval '1 day')",
                [scope, key, fingerprint],
            )
            holding.set()
            release.wait(30)
            other.execute(
                f"UPDATE {IdempotencyKey._meta.db_table} SET response_status = 201, response_body_encrypted = %s"
                " WHERE scope = %s AND key = %s",
                [response_body_encrypt(body={"from": "first"}), scope, key],
            )


@override_settings(IDEMPOTENCY_WAIT_SECONDS=0.3)
def test_in_flight_beyond_the_wait_raises():
    holding, release = threading.Event(), threading.Event()
    fingerprint = request_fingerprint(payload={"x": 1})
    holder = threading.Thread(target=_hold_key_in_open_transaction, args=("s", "g", fingerprint, holding, release))
    holder.start()
    try:
        assert holding.wait(10)
        with pytest.raises(IdempotencyKeyInFlight):
            run("g", {"x": 1}, lambda: (201, {"from": "second"}), scope="s")
    finally:
        release.set()
        holder.join()


@override_settings(IDEMPOTENCY_WAIT_SECONDS=10)
def test_in_flight_request_waits_then_replays():
    holding, release = threading.Event(), threading.Event()
    fingerprint = request_fingerprint(payload={"x": 1})
    holder = threading.Thread(target=_hold_key_in_open_transaction, args=("s", "h", fingerprint, holding, release))
    holder.start()
    assert holding.wait(10)
    threading.Timer(0.3, release.set).start()
    outcome = run("h", {"x": 1}, lambda: (201, {"from": "second"}), scope="s")
    holder.join()
    assert outcome.replayed and outcome.body == {"from": "first"}
