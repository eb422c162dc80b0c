"""Django's Postgres backend, failing fast while Postgres is unreachable.

Why: with Postgres down, every request waited in `pool.getconn()` for the pool
timeout (it was 10 s) before its `503`; with more requests in flight than
request threads, the queue behind them made even `/health/live` take 9.7 s.
Two things fix that:

* a short pool timeout (`DB_POOL_TIMEOUT_SECONDS`, 1 s) and a bounded
  reconnection backoff (`DB_POOL_RECONNECT_TIMEOUT_SECONDS`): psycopg_pool
  doubles its reconnection delay without a cap until `reconnect_timeout`
  (300 s by default), so after a minute of outage it could wait another 30 s
  before trying again; bounded, it starts a fresh attempt within seconds of
  Postgres returning;
* `DatabaseOutage`, a per-process fail-fast gate: after a failed connection
  attempt, requests of this process get an `OperationalError` at once (the API
  answers `503` + `Retry-After`) for `DB_OUTAGE_FAIL_FAST_SECONDS`, then one
  thread probes the pool while the others keep failing fast; the first
  success closes the gate. So at most one request thread per process waits on
  a dead database.

The gate is deliberately process-local: it guards no invariant, it only spares
a process from queueing its threads behind a connection that cannot come; every
process finds out for itself within one pool timeout.
"""

import threading
import time

from django.conf import settings
from django.db.backends.postgresql import base
from psycopg import OperationalError


class DatabaseUnavailable(OperationalError):
    """Raised without touching the pool while the outage gate is closed."""


class DatabaseOutage:
    """Open/half-open/closed gate in front of `pool.getconn()` (see the module docstring)."""

    def __init__(self, *, hold_seconds: float):
        self.hold_seconds = hold_seconds
        self._failed_until = 0.0  # monotonic; 0 = healthy
        self._probe = threading.Lock()

    @property
    def failing(self) -> bool:
        return self._failed_until != 0.0

    def enter(self) -> bool:
        """Return whether this caller is the probe; raise `DatabaseUnavailable` if it must fail fast."""
        failed_until = self._failed_until
        if failed_until == 0.0:
            return False
        if time.monotonic() < failed_until or not self._probe.acquire(blocking=False):
            raise DatabaseUnavailable("database unavailable (a recent connection attempt failed); failing fast")
        return True

    def record(self, *, ok: bool, probe: bool) -> None:
        if ok:
            self._failed_until = 0.0
        else:
            self._failed_until = time.monotonic() + self.hold_seconds
        if probe:
            self._probe.release()


_outage: DatabaseOutage | None = None


def database_outage() -> DatabaseOutage:
    """This process's gate (created on first use, after settings are loaded)."""
    global _outage
    if _outage is None:
        _outage = DatabaseOutage(hold_seconds=settings.DB_OUTAGE_FAIL_FAST_SECONDS)
    return _outage


def database_ping(*, alias: str = "default", timeout: float) -> None:
    """One `SELECT 1` through the alias' pool, waiting at most `timeout` for a connection.

    For readiness: it answers within `timeout` (plus one round trip) whatever
    state Postgres is in, and feeds the outage gate like a request would.
    Raises `OperationalError` when Postgres is unreachable.
    """
    from django.db import connections

    wrapper = connections[alias]
    pool = wrapper.pool
    outage = database_outage()
    probe = outage.enter()
    try:
        if pool is None:  # no pooling configured (management commands may run so)
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT 1")
        else:
            pool.open()
            with pool.connection(timeout=timeout) as conn:
                conn.execute("SELECT 1")
    except OperationalError:
        outage.record(ok=False, probe=probe)
        raise
    outage.record(ok=True, probe=probe)


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        outage = database_outage()
        probe = outage.enter()
        try:
            connection = super().get_new_connection(conn_params)
        except OperationalError:  # PoolTimeout included
            outage.record(ok=False, probe=probe)
            raise
        if probe or outage.failing:
            outage.record(ok=True, probe=probe)
        return connection
