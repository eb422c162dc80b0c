"""Test kit of the mqtt app: a device's MQTT connection (paho, MQTT 3.1.1) to a platform's broker, and any
account's raw session (the broker's own tests)."""

import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho

from mqtt import topics


class MqttRefused(Exception):
    """The broker refused the connection (CONNACK with a failure code)."""


class DeviceConnection:
    """A device connected to the broker as itself (username = its id, password = its token)."""

    def __init__(self, client: paho.Client, device_id: str) -> None:
        self.client = client
        self.device_id = device_id
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subscribed: queue.Queue[list] = queue.Queue()

    def publish(self, kind: str, body, *, qos: int = 1, timeout: float = 10.0, device_id: str | None = None) -> None:
        """Publish on `devices/{id}/{kind}` and wait for the broker's PUBACK (QoS 1)."""
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        info = self.client.publish(topics.device_topic(device_id or self.device_id, kind), payload, qos=qos)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"no PUBACK within {timeout} s"

    def subscribe(self, topic: str, *, timeout: float = 10.0) -> list:
        """Subscribe (QoS 1) and return the SUBACK's reason codes."""
        self.client.subscribe(topic, qos=1)
        return self.subscribed.get(timeout=timeout)

    def next_message(self, timeout: float) -> tuple[str, dict]:
        topic, payload = self.received.get(timeout=timeout)
        return topic, orjson.loads(payload)


@contextmanager
def device_connection(
    mqtt_url: str, device_id: str, token: str, *, client_id: str | None = None, clean_session: bool = True
) -> Iterator[DeviceConnection]:
    url = urlsplit(mqtt_url)
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"{device_id}-{uuid.uuid4().hex[:6]}",
        clean_session=clean_session,
        protocol=paho.MQTTv311,
    )
    client.username_pw_set(device_id, token)
    connection = DeviceConnection(client, device_id)
    connack: queue.Queue = queue.Queue()
    client.on_connect = lambda c, u, flags, reason_code, props: connack.put(reason_code)
    client.on_message = lambda c, u, message: connection.received.put((message.topic, message.payload))
    client.on_subscribe = lambda c, u, mid, reason_codes, props: connection.subscribed.put(list(reason_codes))
    client.connect(url.hostname, url.port or 1883, keepalive=30)
    client.loop_start()
    try:
        reason = connack.get(timeout=15)
        if reason.is_failure:
            raise MqttRefused(str(reason))
        yield connection
    finally:
        client.disconnect()
        client.loop_stop()


def publish_points(connection: DeviceConnection, *, count: int, start_ts: float, stop: threading.Event | None = None):
    """`count` points with distinct timestamps (1 ms apart from `start_ts`, epoch seconds), QoS 1 each."""
    for n in range(count):
        if stop is not None and stop.is_set():
            return
        ts = datetime.fromtimestamp(start_ts + n / 1000, tz=UTC).isoformat()
        connection.publish(topics.TELEMETRY, {"timestamp": ts, "metric": "mqtt", "value": float(n)})


# --- Any account's raw MQTT session (the broker's own tests: mqtt/tests/test_broker_live.py) ---------------


class MqttSession:
    """A connected paho client (MQTT 3.1.1) that records every message it receives, flags included."""

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.session_present = False  # the CONNACK's: the broker resumed a session of this client id
        self.disconnected = threading.Event()  # the broker closed the connection (or we did)

    def subscribe(self, topic_filter: str, *, qos: int = 1, timeout: float = 10.0) -> list[int]:
        """The SUBACK's return codes (granted QoS, or 0x80 refused)."""
        self.client.subscribe(topic_filter, qos=qos)
        return self.subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"no PUBACK for {topic} within {timeout} s"

    def take(self, count: int, *, timeout: float = 15.0) -> list[paho.MQTTMessage]:
        """The next `count` messages, waiting at most `timeout` in all (AssertionError if fewer came)."""
        taken, deadline = [], time.monotonic() + timeout
        while len(taken) < count:
            try:
                taken.append(self.messages.get(timeout=max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                raise AssertionError(f"{len(taken)} of {count} messages within {timeout} s") from None
        return taken


@contextmanager
def mqtt_session(
    mqtt_url: str,
    *,
    username: str | None,
    password: str | None,
    client_id: str = "",
    clean_session: bool = True,
    will: tuple[str, bytes] | None = None,
) -> Iterator[MqttSession]:
    """Connected as `username`/`password` (None: no credentials); `MqttRefused` if the CONNACK refuses.
    Left with a clean DISCONNECT (no last will)."""
    url = urlsplit(mqtt_url)
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=paho.MQTTv311
    )
    if username is not None:
        client.username_pw_set(username, password)
    if will is not None:
        client.will_set(will[0], will[1], qos=1)
    session = MqttSession(client)
    connack: queue.Queue = queue.Queue()
    client.on_connect = lambda c, u, flags, reason_code, props: connack.put((reason_code, flags.session_present))
    client.on_disconnect = lambda *args: session.disconnected.set()
    client.on_message = lambda c, u, message: session.messages.put(message)
    client.on_subscribe = lambda c, u, mid, codes, props: session.subacks.put([code.value for code in codes])
    client.connect(url.hostname, url.port or 1883, keepalive=30)
    client.loop_start()
    try:
        reason, session.session_present = connack.get(timeout=15)
        if reason.is_failure:
            raise MqttRefused(str(reason))
        yield session
    finally:
        client.disconnect()
        client.loop_stop()


def unacknowledging_subscriber_main() -> None:
    """`python -c "from mqtt.testing import unacknowledging_subscriber_main as m; m()" URL USER PASSWORD CLIENT_ID
    FILTER`: a persistent session (QoS 1) that prints `subscribed`, then `got <payload>` for each message, and never
    sends a PUBACK: what a bridge SIGKILLed between receiving a message and acknowledging it leaves behind."""
    mqtt_url, username, password, client_id, topic_filter = sys.argv[1:6]
    url = urlsplit(mqtt_url)
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=paho.MQTTv311,
        manual_ack=True,
    )
    client.username_pw_set(username, password)
    client.on_connect = lambda c, u, flags, reason_code, props: c.subscribe(topic_filter, qos=1)
    client.on_subscribe = lambda *args: print("subscribed", flush=True)
    client.on_message = lambda c, u, message: print("got", message.payload.decode(), flush=True)
    client.connect(url.hostname, url.port or 1883, keepalive=60)
    client.loop_forever()
