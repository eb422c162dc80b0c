"""The MQTT ingest bridge: messages devices publish -> the platform's services, acknowledged after commit.

One bridge is one MQTT session (`manage.py run_mqtt_bridge`, started and supervised by `make worker`):

* **Persistent session** (clean session off, a stable client id per bridge, `MQTT_BRIDGE_CLIENT_ID`
  + its index): while a bridge is down or restarting, the broker keeps the QoS 1 messages of its
  subscriptions for it, and those it had delivered but not yet got an acknowledgement for.
* **Acknowledged after commit** (manual PUBACK): a message is acknowledged only once
  `mqtt.messages.mqtt_message_handle` is done with it: its points committed (or it was refused for
  good and the device told why on `devices/{id}/errors`). A bridge killed at any moment (SIGKILL)
  leaves its unacknowledged messages with the broker, which delivers them again to the next session
  with the same client id; a message stored just before the kill and delivered again is a no-op (a
  point is unique by device, metric and timestamp, `ON CONFLICT DO NOTHING`).
* **Backpressure slows it down** rather than dropping: a message that can't be stored yet (the event
  queue full, Postgres or Redis down) is held, unacknowledged, and retried after the `Retry-After`
  the service gave; the messages behind it wait in the broker (which sends a session only so many
  unacknowledged QoS 1 messages at a time: its in-flight window).
* **Several bridges split the load** through a shared subscription (`$share/{MQTT_SHARED_GROUP}/...`,
  MQTT 5, and EMQX and Mosquitto for 3.1.1 clients too): each message goes to one of them. Without a
  group every bridge would receive every message, so `make worker` then runs one.

Messages are handled by `MQTT_BRIDGE_LANES` threads (4), each taking the messages of a fixed share of
the devices (by a hash of the device id), so one device's messages are handled in the order it sent
them while the lanes wait on Postgres and Redis side by side (one lane: 160 points/s, 4: see
docs/MQTT.md); paho's network thread only queues them and keeps the connection alive. A message
held by backpressure holds its lane (so the device's later messages wait behind it, in order). An acknowledgement is
only valid on the connection that delivered the message: after a reconnect, messages of the
previous connection are not acknowledged (the broker delivers them again; storing them is a no-op).
"""

import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass

import orjson
import paho.mqtt.client as paho
from django.db import close_old_connections

from iot.mqtt import KEEPALIVE_SECONDS, broker_address, mqtt_client_new
from mqtt import topics
from mqtt.messages import Outcome, mqtt_message_handle
from mqtt.metrics import count_message

logger = logging.getLogger(__name__)

# Attempts at a message whose handling raises unexpectedly (a bug, not an outage: outages are
# held and retried without limit); after the last it is acknowledged, logged, counted `failed`
# and the device told, so one poisoned message cannot stop a bridge for good.
MAX_FAILED_ATTEMPTS = 5


@dataclass(frozen=True)
class _Delivery:
    connection: int  # which connection delivered it: acknowledgements are only valid on that one
    message: paho.MQTTMessage


class MqttBridge:
    def __init__(self, *, client_id: str, shared_group: str = "", lanes: int = 1, subscribe_qos: int = 1) -> None:
        self.client_id = client_id
        self.filters = topics.bridge_filters(shared_group=shared_group)
        self.subscribe_qos = subscribe_qos
        self.handled = 0
        self._handled_lock = threading.Lock()
        self._lanes: list[queue.Queue[_Delivery]] = [queue.Queue() for _ in range(max(1, lanes))]
        self._connection = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._client: paho.Client | None = None

    # --- paho's network thread ---------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.error("MQTT bridge %s: the broker refused the connection: %s", self.client_id, reason_code)
            return
        self._connection += 1
        # Subscribing again is harmless when the session kept the subscriptions, and needed when it didn't.
        client.subscribe([(f, self.subscribe_qos) for f in self.filters])
        self._connected.set()
        logger.info("MQTT bridge %s connected (session present: %s)", self.client_id, flags.session_present)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [f for f, code in zip(self.filters, reason_codes, strict=False) if code.is_failure]
        if refused:
            logger.error("MQTT bridge %s: the broker refused the subscriptions %s", self.client_id, refused)
            return
        self._subscribed.set()
        logger.info("MQTT bridge %s subscribed to %s", self.client_id, ", ".join(self.filters))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            logger.warning("MQTT bridge %s disconnected (%s); reconnecting", self.client_id, reason_code)

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        # One device's messages always take the same lane: they are handled in the order it sent them.
        parts = message.topic.split("/", 2)
        device = parts[1] if len(parts) > 1 else message.topic
        lane = self._lanes[zlib.crc32(device.encode()) % len(self._lanes)]
        lane.put(_Delivery(connection=self._connection, message=message))

    # --- the main thread -----------------------------------------------------------------------

    def start(self) -> None:
        address = broker_address()
        client = mqtt_client_new(client_id=self.client_id, clean_session=False, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.connect_async(address.host, address.port, keepalive=KEEPALIVE_SECONDS)
        client.loop_start()
        self._client = client

    def wait_subscribed(self, timeout: float) -> bool:
        """Whether the broker confirmed the subscriptions (SUBACK) within `timeout` seconds."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        """Stop after the message being handled (it is acknowledged if it was done with, else redelivered)."""
        self._stopping.set()

    def run(self) -> None:
        """Handle messages until `stop()`; then disconnect (the session and its messages stay with the broker)."""
        if self._client is None:
            self.start()
        threads = [
            threading.Thread(target=self._run_lane, args=(lane,), name=f"mqtt-lane-{n}", daemon=True)
            for n, lane in enumerate(self._lanes)
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def _run_lane(self, lane: "queue.Queue[_Delivery]") -> None:
        try:
            while not self._stopping.is_set():
                try:
                    delivery = lane.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._handle(delivery)
        finally:
            close_old_connections()

    def _attempt(self, message: paho.MQTTMessage) -> Outcome | None:
        """Handle the message until it is done with; None if the bridge is stopping first."""
        failures = 0
        while not self._stopping.is_set():
            close_old_connections()
            try:
                outcome = mqtt_message_handle(topic=message.topic, payload=message.payload)
            except Exception:
                failures += 1
                logger.exception("MQTT message on %s failed (attempt %d)", message.topic, failures)
                if failures < MAX_FAILED_ATTEMPTS:
                    self._stopping.wait(min(0.1 * 2**failures, 5.0))
                    continue
                count_message(kind=_kind(message.topic), outcome="failed")
                return Outcome(
                    outcome="failed",
                    error={
                        "topic": message.topic,
                        "status": 500,
                        "error": {"detail": "The message could not be handled."},
                    },
                )
            finally:
                close_old_connections()
            if outcome.ack:
                return outcome
            # Held: the broker keeps it (and those behind it) until it can be stored. A pause, not a fix for a race.
            self._stopping.wait(max(outcome.retry_after, 0.05))
        return None

    def _handle(self, delivery: _Delivery) -> None:
        message = delivery.message
        outcome = self._attempt(message)
        if outcome is None:
            return  # stopping: not acknowledged, so delivered again to this session's next connection
        if outcome.error is not None:
            self._tell_device(message.topic, outcome.error)
        if message.qos > 0 and delivery.connection == self._connection and self._connected.is_set():
            self._client.ack(message.mid, message.qos)
        with self._handled_lock:
            self.handled += 1

    def _tell_device(self, topic: str, error: dict) -> None:
        parsed = topics.topic_parse(topic)
        if parsed is None:
            return
        # QoS 1 without waiting for the broker's PUBACK: telling the device is best effort, and a
        # bridge that waited here would hold back every message behind this one.
        self._client.publish(
            topics.device_topic(parsed.device_id, topics.ERRORS), orjson.dumps({**error, "at": time.time()}), qos=1
        )


def _kind(topic: str) -> str:
    parsed = topics.topic_parse(topic)
    return parsed.kind if parsed is not None else "unknown"
