"""The embedded broker asks the platform who may connect and which topics they may use.

An amqtt authentication and topic-checking plugin: at CONNECT it posts `{"username", "password",
"clientid"}` to `<auth_url>/auth`, at a SUBSCRIBE or PUBLISH `{"username", "clientid", "topic",
"action"}` to `<auth_url>/acl` (the platform's `POST /mqtt/auth`, `/mqtt/acl`: EMQX 5's HTTP
authn/authz shapes, the same endpoints an external EMQX is pointed at), with the shared secret
in `X-MQTT-Auth-Secret`. Only `{"result": "allow"}` allows; anything else (deny, ignore, an error
status, no answer within `timeout_seconds`, a platform that is down) refuses: with no other
authenticator behind this one, "can't tell" must mean no.

* A superuser login (the platform's bridge account, `is_superuser: true`) is never asked about
  topics again: every message the bridge publishes would otherwise cost an HTTP round trip.
* A device's answers are kept per connection for `acl_cache_seconds` (default 5 s; EMQX keeps
  its authorization cache a minute): one question per topic and action in that time, not one per
  message. So a device decommissioned while connected may go on publishing on its own topics for
  up to that long (its telemetry is refused by ingestion anyway: the insert finds no live device);
  at its next connection or subscription after that it is refused. A failed question is not kept.
* Delivery to a subscriber (amqtt's "receive" check) is not asked about: the subscription was.
"""

import logging
import time
from dataclasses import dataclass

import httpx
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-MQTT-Auth-Secret"
# Per-session state this plugin keeps in amqtt's `Session.attributes`.
SUPERUSER = "iot.mqtt.superuser"
ACL_CACHE = "iot.mqtt.acl_cache"


class HttpAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):
    @dataclass
    class Config:
        auth_url: str = "http://127.0.0.1:8000/mqtt"
        secret: str = ""
        timeout_seconds: float = 5.0
        acl_cache_seconds: float = 5.0
        # Topics remembered per connection; a device has five, so more means something is probing.
        acl_cache_size: int = 64

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._client = httpx.AsyncClient(
            base_url=self.config.auth_url.rstrip("/") + "/",
            headers={SECRET_HEADER: self.config.secret},
            timeout=self.config.timeout_seconds,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def _ask(self, path: str, body: dict) -> dict | None:
        """The platform's answer, or None when there is none to trust (then the caller refuses)."""
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            logger.warning("MQTT %s: no answer from %s%s: %r", path, self._client.base_url, path, exc)
            return None
        if response.status_code != 200:
            logger.warning(
                "MQTT %s: %s answered %d: %s", path, self._client.base_url, response.status_code, response.text[:200]
            )
            return None
        try:
            answer = response.json()
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    async def authenticate(self, *, session: Session) -> bool:
        session.attributes[SUPERUSER] = False
        session.attributes[ACL_CACHE] = {}
        if not session.username:
            return False  # no anonymous logins
        answer = await self._ask(
            "auth",
            {"username": session.username, "password": session.password or "", "clientid": session.client_id or ""},
        )
        if answer is None or answer.get("result") != "allow":
            return False
        session.attributes[SUPERUSER] = answer.get("is_superuser") is True
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if action == Action.RECEIVE:
            return True
        if session is None or not topic or action not in (Action.PUBLISH, Action.SUBSCRIBE):
            return False
        if session.attributes.get(SUPERUSER):
            return True
        cache: dict[tuple[str, str], tuple[bool, float]] = session.attributes.setdefault(ACL_CACHE, {})
        key, now = (str(action), topic), time.monotonic()
        kept = cache.get(key)
        if kept is not None and kept[1] > now:
            return kept[0]
        answer = await self._ask(
            "acl",
            {
                "username": session.username or "",
                "clientid": session.client_id or "",
                "topic": topic,
                "action": str(action),
            },
        )
        if answer is None:
            return False
        allowed = answer.get("result") == "allow"
        if len(cache) >= self.config.acl_cache_size:
            cache.clear()
        cache[key] = (allowed, now + self.config.acl_cache_seconds)
        return allowed
