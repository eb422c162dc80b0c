"""The platform's own MQTT connections: to the broker devices speak to (`MQTT_URL`), as the bridge account.

Two users: the ingest bridge (`mqtt.bridge`, its own client with a persistent session and manual
acknowledgements) and whatever pushes a message to a device (an OTA offer, `mqtt.events`; a refusal
on `devices/{id}/errors`), through `mqtt_publish`: one client per process, connected on first use,
kept open (paho's network thread reconnects it), so a publish is one round trip to the broker.

`mqtt_publish` returns once the broker acknowledged the message (QoS 1 PUBACK) and raises
`MqttUnavailable` otherwise, so a caller that must not lose the message (an event handler, retried
by the event queue) knows it was not delivered to the broker.

The broker: any MQTT 3.1.1/5 broker that authenticates against `POST /mqtt/auth` (docs/MQTT.md);
`make run` starts an embedded one when `MQTT_URL` is unset. Empty `MQTT_URL`: MQTT is off, and
`mqtt_enabled()` says so (publishing then raises).
"""

import logging
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from django.conf import settings

logger = logging.getLogger(__name__)

# Seconds between keep-alive pings: a bridge that died is noticed by the broker within 1.5x this
# (MQTT 3.1.1 §3.1.2.10) and its unacknowledged messages go to the next session with its client id.
KEEPALIVE_SECONDS = 15


class MqttUnavailable(Exception):
    """MQTT is off, the broker can't be reached, or it did not acknowledge a message in time."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def mqtt_enabled() -> bool:
    return bool(settings.MQTT_URL)


def broker_address() -> BrokerAddress:
    """`MQTT_URL` (`mqtt://host:port`, or `mqtts://` for TLS) as host, port, tls."""
    if not settings.MQTT_URL:
        raise MqttUnavailable("MQTT is not configured (MQTT_URL is empty)")
    url = urlsplit(settings.MQTT_URL)
    if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise MqttUnavailable(f"MQTT_URL must be mqtt://host:port or mqtts://host:port, not {settings.MQTT_URL!r}")
    tls = url.scheme in ("mqtts", "ssl")
    return BrokerAddress(host=url.hostname or "127.0.0.1", port=url.port or (8883 if tls else 1883), tls=tls)


def mqtt_client_new(*, client_id: str, clean_session: bool = True, manual_ack: bool = False) -> paho.Client:
    """A paho client (MQTT 3.1.1) with the bridge account's credentials, not connected yet."""
    address = broker_address()
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=paho.MQTTv311,
        manual_ack=manual_ack,
    )
    client.username_pw_set(settings.MQTT_BRIDGE_USERNAME, settings.MQTT_BRIDGE_PASSWORD)
    if address.tls:
        client.tls_set()
    client.reconnect_delay_set(min_delay=1, max_delay=15)
    return client


class _Publisher:
    """The process's publishing connection (clean session: it subscribes to nothing)."""

    def __init__(self) -> None:
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        # Guards the creation of this process's one client (a per-process object, not a cross-process guarantee).
        self._lock = threading.Lock()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("MQTT publisher: the broker refused the connection: %s", reason_code)
            return
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()

    def client(self, timeout: float) -> paho.Client:
        with self._lock:
            if self._client is None:
                address = broker_address()
                client = mqtt_client_new(client_id="")
                client.on_connect = self._on_connect
                client.on_disconnect = self._on_disconnect
                try:
                    client.connect_async(address.host, address.port, keepalive=KEEPALIVE_SECONDS)
                except (OSError, ValueError) as exc:
                    raise MqttUnavailable(f"MQTT broker {address.host}:{address.port}: {exc}") from exc
                client.loop_start()
                self._client = client
        if not self._connected.wait(timeout):
            raise MqttUnavailable("not connected to the MQTT broker")
        return self._client

    def publish(self, *, topic: str, payload: bytes, qos: int, timeout: float) -> None:
        client = self.client(timeout)
        info = client.publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttUnavailable(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise MqttUnavailable(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise MqttUnavailable(f"the broker did not acknowledge a message to {topic} within {timeout} s")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.disconnect()
                self._client.loop_stop()
                self._client = None
                self._connected.clear()


_publisher = _Publisher()


def mqtt_publish(*, topic: str, payload: bytes, qos: int = 1, timeout: float = 5.0) -> None:
    """Publish and wait for the broker's acknowledgement (QoS 1); `MqttUnavailable` if it did not come."""
    _publisher.publish(topic=topic, payload=payload, qos=qos, timeout=timeout)


def mqtt_publisher_close() -> None:
    """Disconnect this process's publishing client (tests; a worker shutting down)."""
    _publisher.close()
