"""Scaled out: two independent server sets (each web x2 + worker, as two machines behind a load balancer)
on one Postgres and one Redis namespace, hammered at the same time, keep every invariant exactly.

No process holds state of its own (docs/SCALING.md), so a second set changes nothing: one serial number
registered from both sets at once is one device; one device's rate limit is shared to the point; an alert
rule violated from both sets is one open alert counting every violating point; an `Idempotency-Key`
replayed on both sets is stored once; the event queue, fed by both sets and read by both sets' consumers
(one consumer group: whichever is free takes the next entry), ends with nothing pending and every device's
count equal to the points stored. Beat runs in the first set only, as docs/SCALING.md advises.
"""

import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle

import httpx
import pytest

from iot.testing.live import UNLIMITED, dedicated_platforms, register_device
from iot.testing.processes import http_client, wait_until
from iot.testing.telemetry import batch_body, point_body
from telemetry.testing import stored_points

pytestmark = pytest.mark.live

LIMIT = 30
ENV = {
    **UNLIMITED,
    "RATE_LIMIT_TELEMETRY_PER_DEVICE": str(LIMIT),
    # Small pools: two sets on a Postgres the rest of the suite shares.
    "WEB_THREADS": "8",
    "WEB_OPS_THREADS": "1",
    "DB_POOL_MAX_SIZE": "10",
    "EVENT_BUS_WORKER_COUNT": "1",
}


def _spread(clients: list[httpx.Client], count: int, send) -> list[httpx.Response]:
    """`count` calls of `send(client, n)`, alternating between the sets, 32 at a time."""
    pairs = list(zip(range(count), cycle(clients), strict=False))
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(lambda pair: send(pair[1], pair[0]), pairs))


def test_two_server_sets_on_one_database_and_redis_keep_every_invariant(
    django_db_setup, django_db_blocker, platform_logs, operator_token, settings
):
    from alerts.models import Alert
    from devices.models import Device

    name = f"two-sets-{uuid.uuid4().hex[:6]}"
    with dedicated_platforms(
        django_db_blocker, platform_logs, name=name, env=ENV, set_env=[{}, {"WORKER_BEAT": "0"}]
    ) as sets:
        clients = [http_client(running, operator_token) for running in sets]
        try:
            a, b = clients
            # 1. One serial number, 40 registrations at once over both sets: one device.
            serial = f"SN-TWOSETS-{uuid.uuid4().hex}"
            body = {"serial_number": serial, "device_type": "sensor", "firmware_version": "1.0.0"}
            registered = _spread(clients, 40, lambda client, n: client.post("/devices", json=body))
            assert Counter(r.status_code for r in registered) == {201: 1, 200: 39}
            assert len({r.json()["id"] for r in registered}) == 1
            with django_db_blocker.unblock():
                assert Device.objects.filter(serial_number=serial).count() == 1

            # 2. One device's rate limit, shared to the point: 80 points over both sets, LIMIT accepted.
            limited = register_device(a, "SN-TWOSETS")["id"]
            answers = _spread(clients, 80, lambda client, n: client.post("/telemetry/point", json=point_body(limited)))
            assert Counter(r.status_code for r in answers) == {202: LIMIT, 429: 80 - LIMIT}
            accepted_by_set = Counter(n % 2 for n, r in enumerate(answers) if r.status_code == 202)
            assert len(accepted_by_set) == 2  # both sets took a share of the one limit
            assert stored_points(django_db_blocker, limited) == LIMIT

            # 3. A rule violated from both sets: one open alert, every violating point counted.
            group = f"grp-{uuid.uuid4().hex[:8]}"
            rule = {"group_id": group, "metric": "temperature", "operator": "gt", "threshold": 50.0}
            created = b.post("/alerts/rules", json=rule)
            assert created.status_code == 201, created.text
            hot = register_device(b, "SN-TWOSETS", group_id=group)["id"]
            violations = _spread(
                clients, 24, lambda client, n: client.post("/telemetry/point", json=point_body(hot, value=60.0 + n))
            )
            assert [r.status_code for r in violations] == [202] * 24
            with django_db_blocker.unblock():
                alerts = list(Alert.objects.filter(rule_id=created.json()["id"], device_id=hot))
            assert [(alert.status, alert.occurrences) for alert in alerts] == [("open", 24)]

            # 4. One Idempotency-Key replayed on both sets at once: stored once, the same answer everywhere.
            retried = register_device(a, "SN-TWOSETS")["id"]
            key = {"Idempotency-Key": f"two-sets-{uuid.uuid4().hex}"}
            batch = batch_body(retried, 10)
            replays = _spread(clients, 20, lambda client, n: client.post("/telemetry/batch", json=batch, headers=key))
            assert [r.status_code for r in replays] == [202] * 20
            assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in replays) == 1
            assert stored_points(django_db_blocker, retried) == 10

            # 5. Both sets' consumers drain the one queue; every device's count equals its stored points.
            devices = {limited: LIMIT, hot: 24, retried: 10}

            def counted() -> dict[str, int]:
                return {d: a.get(f"/analytics/devices/{d}").json()["message_count"] for d in devices}

            wait_until(lambda: counted() == devices, timeout=60, message="every event consumed and counted")
            settings.REDIS_KEY_PREFIX = sets[0].env["REDIS_KEY_PREFIX"]
            from iot.event_queue import GROUP, event_queue_depth
            from iot.redis import get_redis, redis_tagged_key

            wait_until(lambda: event_queue_depth() == 0, timeout=30, message="the queue drained")
            assert get_redis().xpending(redis_tagged_key("events", "stream"), GROUP)["pending"] == 0
            for d, points in devices.items():
                assert stored_points(django_db_blocker, d) == points
        finally:
            for client in clients:
                client.close()
