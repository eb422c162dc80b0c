"""What lets a transaction-mode pooler (PgBouncer `pool_mode = transaction`) sit between the platform and
Postgres (docs/SCALING.md): no server-side prepared statement and no session state outlives a transaction.

A pooler in transaction mode hands each transaction whichever server connection is free, so a statement
prepared in one session is missing in the next ("prepared statement _pg3_0 does not exist", before
PgBouncer 1.21). Ingestion binds its parameters server-side (binary arrays, `telemetry.services`), which
is fine there (the unnamed statement lives for one execution); psycopg would also *prepare* a statement
run 5 times, but Django turns that off (`prepare_threshold=None` unless set in OPTIONS), and these tests
keep it so.
"""

import pytest
from django.db import connection
from django.utils import timezone

from devices.testing import device_create
from telemetry.services import PointColumns, telemetry_points_ingest


@pytest.mark.django_db(transaction=True)
def test_ingestion_leaves_no_prepared_statement_in_the_session(settings, redis_namespace):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 1000
    device = device_create(serial_prefix="SN-POOLER").device
    for n in range(10):  # twice psycopg's default prepare threshold
        telemetry_points_ingest(
            batch=PointColumns(device_id=device.id, metrics=["t"], timestamps=[timezone.now()], values=[float(n)])
        )
    assert connection.connection.prepare_threshold is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 0


@pytest.mark.django_db(transaction=True)
def test_session_settings_do_not_outlive_their_transaction(settings, redis_namespace):
    """The idempotency claim bounds `lock_timeout` for itself only (`set_config(..., true)`, then `RESET`,
    i.e. the server's default, which the session had): once its transaction ends the session is as it
    was, whichever client a pooler gives it to next."""
    from iot.idempotency.services import idempotent_execute

    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout")
        before = cursor.fetchone()[0]
    idempotent_execute(scope="pooler-test", key="k1", fingerprint="f", handler=lambda: (200, {"ok": True}))
    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone()[0] == before
