"""The broker's questions about devices, answered: may this login connect, may it use this topic.

The broker (the embedded one, `mqtt.broker`, or EMQX) asks `POST /mqtt/auth` at every CONNECT and
`POST /mqtt/acl` at a publish or a subscribe (the embedded broker keeps an answer for a few seconds
per connection, EMQX as its authorization cache says). Two kinds of login:

* **a device**: username = its id, password = its token, checked exactly as HTTP's
  `Authorization: Device <token>` is (`mqtt.selectors.mqtt_device_by_credentials`). It may publish
  only on its own `devices/{id}/telemetry`, `/ota/status` and `/status`, and subscribe only to its own
  `devices/{id}/ota` and `/errors`: exact topics, so a filter with `+` or `#` is refused. Every check
  reads the device again (version-guarded cache), so a device decommissioned or deleted is refused
  from its next question on, not when a cache entry expires.
* **the platform's bridge account** (`MQTT_BRIDGE_USERNAME` / `MQTT_BRIDGE_PASSWORD`): the ingest
  bridge and whatever publishes to devices. A superuser: any topic. Without a configured password
  the account does not exist (every login with that username is refused).

Each answer is counted by its result (`mqtt.metrics`). A refusal is an answer ("deny"), never an
error: the broker only needs allow or deny.
"""

import hmac
import logging
from dataclasses import dataclass

from django.conf import settings

from mqtt import selectors, topics
from mqtt.metrics import ACL_DECISIONS, AUTH_DECISIONS

logger = logging.getLogger(__name__)

PUBLISH = "publish"
SUBSCRIBE = "subscribe"
ACTIONS = (PUBLISH, SUBSCRIBE)


@dataclass(frozen=True)
class MqttDecision:
    allowed: bool
    is_superuser: bool = False
    reason: str = ""  # why, for the log (never shown to the client: the broker answers allow or deny)

    @property
    def result(self) -> str:
        return "allow" if self.allowed else "deny"


def _bridge_account(username: str) -> bool:
    return bool(settings.MQTT_BRIDGE_USERNAME) and username == settings.MQTT_BRIDGE_USERNAME


def _bridge_password_matches(password: str) -> bool:
    expected = settings.MQTT_BRIDGE_PASSWORD
    # Constant time: the comparison does not tell how much of a guess was right.
    return bool(expected) and hmac.compare_digest(password.encode(), expected.encode())


def _authenticate(username: str, password: str) -> MqttDecision:
    if _bridge_account(username):
        if _bridge_password_matches(password):
            return MqttDecision(allowed=True, is_superuser=True, reason="bridge account")
        return MqttDecision(allowed=False, reason="bridge account: wrong password, or MQTT_BRIDGE_PASSWORD unset")
    device_id = selectors.mqtt_device_id(username)
    if device_id is None:
        return MqttDecision(allowed=False, reason="the username is not a device id")
    if not password:
        return MqttDecision(allowed=False, reason="no token")
    if selectors.mqtt_device_by_credentials(device_id=device_id, token=password) is None:
        return MqttDecision(allowed=False, reason="unknown device, wrong token, or decommissioned")
    return MqttDecision(allowed=True, reason="device")


def mqtt_client_authenticate(*, username: str, password: str, clientid: str) -> MqttDecision:
    """May this MQTT login connect? (the client id is free: it only names the session)."""
    decision = _authenticate(username, password)
    AUTH_DECISIONS.labels(result=decision.result).inc()
    if not decision.allowed:
        logger.info("MQTT login refused: username %r, client id %r: %s", username[:64], clientid[:64], decision.reason)
    return decision


def _authorize(username: str, topic: str, action: str) -> MqttDecision:
    if _bridge_account(username) and settings.MQTT_BRIDGE_PASSWORD:
        return MqttDecision(allowed=True, is_superuser=True, reason="bridge account")
    device_id = selectors.mqtt_device_id(username)
    if device_id is None:
        return MqttDecision(allowed=False, reason="the username is not a device id")
    kinds = topics.DEVICE_PUBLISHES if action == PUBLISH else topics.DEVICE_SUBSCRIBES
    # Exact topics of its own: a wildcard filter never equals one, so it is refused with the rest.
    if topic not in {topics.device_topic(device_id, kind) for kind in kinds}:
        return MqttDecision(allowed=False, reason=f"not a topic this device may {action}")
    if not selectors.mqtt_device_is_live(device_id=device_id):
        return MqttDecision(allowed=False, reason="unknown or decommissioned device")
    return MqttDecision(allowed=True, reason="device, own topic")


def mqtt_topic_authorize(*, username: str, clientid: str, topic: str, action: str) -> MqttDecision:
    """May this (authenticated) login publish to / subscribe to `topic`? `action` is one of ACTIONS."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    decision = _authorize(username, topic, action)
    ACL_DECISIONS.labels(action=action, result=decision.result).inc()
    if not decision.allowed:
        logger.info(
            "MQTT %s refused: username %r, client id %r, topic %r: %s",
            action,
            username[:64],
            clientid[:64],
            topic[:256],
            decision.reason,
        )
    return decision
