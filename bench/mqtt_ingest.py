"""Telemetry over MQTT beside HTTP, from one run on one platform (issue 13's closing figure).

    python bench/mqtt_ingest.py [--devices 20] [--points 10000] [--seconds 10]

One platform as `make run` starts it (web with WEB_CONCURRENCY processes, the worker with its MQTT
bridge, the embedded broker) on a fresh database, limits out of the way (`UNLIMITED_ENV`). Then:

* HTTP: `wrk` (C, 2 threads, 64 connections) posting single points (`bench/wrk/point.lua`), for
  `--seconds`: points/s = 202s/s;
* MQTT: `--devices` device connections (paho, each as itself: id and token) publish `--points`
  single-point messages, QoS 1, as fast as the broker takes them (up to 100 in flight each); the
  figure is points stored in Postgres per second, from the first publish to the last point stored
  (polled), so it is what the bridge sustains end to end, not what the broker accepts.

Both are printed with the ratio, and the CPU this client process used, to show it is not the limit.
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import paho.mqtt.client as paho
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import UNLIMITED_ENV, api_token, fresh_database, running_platform  # noqa: E402

from iot.testing.processes import psycopg_conninfo  # noqa: E402

WRK_DIR = Path(__file__).resolve().parent / "wrk"


def register(base_url: str, token: str, count: int) -> list[tuple[str, str]]:
    """`count` devices registered over HTTP: (id, device token) each."""
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Token {token}"}, timeout=30) as client:
        devices = []
        for _ in range(count):
            body = {
                "serial_number": f"SN-MQTT-BENCH-{uuid.uuid4().hex}",
                "device_type": "sensor",
                "firmware_version": "1",
            }
            response = client.post("/devices", json=body)
            response.raise_for_status()
            devices.append((response.json()["id"], response.json()["device_token"]))
        return devices


def wrk_points_per_second(url: str, *, token: str, devices: list[str], seconds: float) -> float:
    """Single points over HTTP with wrk (C, 2 threads, 64 connections): 202s per second (errors refused)."""
    env = {
        **os.environ,
        "BENCH_TOKEN": token,
        "BENCH_DEVICES": ",".join(devices),
        "BENCH_BASE_EPOCH": str(int(time.time()) - 1200),
    }
    argv = ["wrk", "-t", "2", "-c", "64", "-d", f"{round(seconds)}s", "-s", str(WRK_DIR / "point.lua"), url]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw refusals:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def stored(conninfo: dict, device_ids: list[str]) -> int:
    with psycopg.connect(**conninfo) as conn:
        return conn.execute(
            "SELECT count(*) FROM telemetry_point WHERE device_id = ANY(%s::uuid[])", [device_ids]
        ).fetchone()[0]


def mqtt_publish_all(mqtt_url: str, devices: list[tuple[str, str]], points: int) -> float:
    """Connect every device, publish `points` messages spread over them; returns when all are PUBACKed."""
    host, port = mqtt_url.removeprefix("mqtt://").split(":")
    clients = []
    for device_id, token in devices:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv311)
        client.username_pw_set(device_id, token)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p, ev=connected: ev.set() if not rc.is_failure else None
        client.connect(host, int(port), keepalive=60)
        client.loop_start()
        if not connected.wait(15):
            raise RuntimeError(f"device {device_id} could not connect to {mqtt_url}")
        clients.append((device_id, client))
    base = time.time() - 600
    infos = []
    started = time.perf_counter()
    for n in range(points):
        device_id, client = clients[n % len(clients)]
        ts = datetime.fromtimestamp(base + n / 1000, tz=UTC).isoformat()
        body = orjson.dumps({"timestamp": ts, "metric": "mqtt_bench", "value": float(n % 100)})
        infos.append(client.publish(f"devices/{device_id}/telemetry", body, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    for _, client in clients:
        client.disconnect()
        client.loop_stop()
    return started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--web-concurrency", type=int, default=4)
    args = parser.parse_args()

    database = fresh_database("iot_bench_mqtt")
    token = api_token(database)
    conninfo = psycopg_conninfo(__import__("environ").Env.db_url_config(database))
    with running_platform(
        database, workers=args.web_concurrency, extra_env=UNLIMITED_ENV, with_worker=True, mqtt=True
    ) as platform:
        devices = register(platform.base_url, token, args.devices)
        ids = [device_id for device_id, _ in devices]
        http = wrk_points_per_second(
            platform.base_url + "/telemetry/point", token=token, devices=ids, seconds=args.seconds
        )
        before_http = stored(conninfo, ids)

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = mqtt_publish_all(platform.mqtt_url, devices, args.points)
        acked = time.perf_counter() - started
        deadline = time.monotonic() + 600
        while stored(conninfo, ids) < before_http + args.points:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {stored(conninfo, ids) - before_http} of {args.points} MQTT points stored")
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)

    mqtt_rate = args.points / elapsed
    lanes = os.environ.get("MQTT_BRIDGE_LANES", "4")
    print(f"2 CPUs; WEB_CONCURRENCY={args.web_concurrency}; one MQTT bridge with {lanes} lanes; embedded amqtt broker")
    print(f"  HTTP  POST /telemetry/point (wrk, 64 conns)   {http:>9,.0f} points/s")
    print(
        f"  MQTT  QoS 1 single points ({args.devices} devices)   {mqtt_rate:>9,.0f} points/s stored"
        f"  ({args.points} in {elapsed:.1f} s; the broker had acknowledged them all after {acked:.1f} s;"
        f" client CPU {client_cpu / elapsed:.2f} cores)"
    )
    print(f"  MQTT / HTTP: {mqtt_rate / http:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
