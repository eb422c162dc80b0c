"""The MQTT ingest bridge on the live platform (web x2, the worker with its bridge, the embedded broker),
with real device connections (paho): QoS 1 points stored exactly once, also when the bridge is
SIGKILLed mid-stream; refusals told on `devices/{id}/errors`; backpressure waited out, not dropped."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from iot.testing.live import UNLIMITED, dedicated_platform, metric_value, register_device
from iot.testing.processes import http_client, wait_until
from mqtt.testing import device_connection, publish_points
from telemetry.testing import stored_points

pytestmark = pytest.mark.live

DEVICES, POINTS = 10, 100


@pytest.fixture(scope="module")
def platform(django_db_setup, django_db_blocker, platform_logs):
    """A platform with its own broker and bridge, and no rate limit: a redelivered message counts against the
    device's limit again (as an HTTP retry does), which would refuse the last points of a killed stream."""
    with dedicated_platform(django_db_blocker, platform_logs, name="mqtt-bridge", env=UNLIMITED, mqtt=True) as running:
        yield running


@pytest.fixture(scope="module")
def api(platform, operator_token):
    with http_client(platform, operator_token) as client:
        yield client


def registered(api, prefix: str, count: int) -> list[dict]:
    return [register_device(api, prefix) for _ in range(count)]


def publish_fleet(platform, devices: list[dict], *, points: int, start_ts: float) -> None:
    def one(device):
        with device_connection(platform.mqtt_url, device["id"], device["device_token"]) as connection:
            publish_points(connection, count=points, start_ts=start_ts)

    with ThreadPoolExecutor(len(devices)) as pool:
        list(pool.map(one, devices))


def stored_counts(django_db_blocker, devices: list[dict]) -> list[int]:
    return [stored_points(django_db_blocker, device["id"]) for device in devices]


def bridge_processes(platform) -> list[psutil.Process]:
    found = []
    for managed in platform.processes:
        try:
            tree = [psutil.Process(managed.process.pid), *psutil.Process(managed.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                if any("run_mqtt_bridge" in part for part in process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                continue
    return found


def test_a_thousand_qos1_points_from_ten_devices_are_stored_exactly_once(api, platform, django_db_blocker):
    devices = registered(api, "SN-MQTT-1K", DEVICES)
    started = time.monotonic()
    publish_fleet(platform, devices, points=POINTS, start_ts=time.time() - 60)
    wait_until(
        lambda: stored_counts(django_db_blocker, devices) == [POINTS] * DEVICES,
        timeout=120,
        interval=0.2,
        message="every point stored",
    )
    seconds = time.monotonic() - started
    print(f"\n{DEVICES * POINTS} QoS 1 points over MQTT stored in {seconds:.1f} s ({DEVICES * POINTS / seconds:.0f}/s)")
    # Publishing the same points again (a device that did not get its PUBACKs) stores nothing more.
    publish_fleet(platform, devices[:2], points=POINTS, start_ts=time.time() - 60)  # new timestamps: 200 more
    wait_until(lambda: stored_counts(django_db_blocker, devices[:2]) == [2 * POINTS] * 2, timeout=60, interval=0.2)


def test_a_bridge_sigkilled_mid_stream_loses_and_duplicates_nothing(api, platform, django_db_blocker):
    devices = registered(api, "SN-MQTT-KILL", DEVICES)
    (bridge,) = bridge_processes(platform)
    start_ts = time.time() - 120
    publisher = threading.Thread(
        target=publish_fleet, args=(platform, devices), kwargs={"points": POINTS, "start_ts": start_ts}
    )
    publisher.start()
    wait_until(
        lambda: sum(stored_counts(django_db_blocker, devices)) >= DEVICES * POINTS // 5,
        timeout=60,
        interval=0.05,
        message="a fifth stored",
    )
    bridge.kill()  # SIGKILL: its unacknowledged messages stay with the broker
    killed_at = sum(stored_counts(django_db_blocker, devices))
    publisher.join(timeout=120)
    assert not publisher.is_alive()
    wait_until(
        lambda: stored_counts(django_db_blocker, devices) == [POINTS] * DEVICES,
        timeout=120,
        interval=0.2,
        message=f"every point stored after the kill (at {killed_at})",
    )
    (restarted,) = wait_until(lambda: bridge_processes(platform) or None, timeout=30, message="the bridge restarted")
    assert restarted.pid != bridge.pid
    assert killed_at < DEVICES * POINTS, "the kill came after the last point: it proved nothing"


def test_a_refused_message_is_told_on_the_devices_errors_topic(api, platform):
    (device,) = registered(api, "SN-MQTT-ERR", 1)
    invalid_before = metric_value(api, "iot_mqtt_messages_total", kind="telemetry", outcome="invalid")
    with device_connection(platform.mqtt_url, device["id"], device["device_token"]) as connection:
        assert connection.subscribe(f"devices/{device['id']}/errors") == [1]
        connection.publish("telemetry", b'{"timestamp": "yesterday", "metric": "t", "value": 1}')
        topic, error = connection.next_message(timeout=30)
    assert topic == f"devices/{device['id']}/errors"
    assert error["topic"] == f"devices/{device['id']}/telemetry" and error["status"] == 400
    assert "timestamp" in error["error"]
    wait_until(
        lambda: metric_value(api, "iot_mqtt_messages_total", kind="telemetry", outcome="invalid") > invalid_before,
        timeout=30,
        message="the refusal counted",
    )
