"""MQTT for the simulator: each device on its own broker connection, the way a real device talks.

    transport = MqttTransport("mqtt://127.0.0.1:1883", http=HttpTransport("http://127.0.0.1:8000"))

The device topics (docs: ../shared/CONTRACT.md, the platform's side in `mqtt/`; spelled out
here again because the simulator is a client of the platform and imports none of its apps):

    devices/{id}/telemetry    publish   a point or a batch, the JSON of POST /telemetry/point|batch
    devices/{id}/ota/status   publish   a report, the JSON of POST /firmware/updates/{u}/report + update_id
    devices/{id}/status       publish   {"status": "online"} after connecting; {"status": "offline"} as the
                                        last will, and published before a clean disconnect (`aclose`)
    devices/{id}/ota          subscribe the update waiting for the device, the JSON of GET /firmware/device/update
    devices/{id}/errors       subscribe why a message was refused: {topic, status, error, retry_after?}

Connections. One per device, opened on the device's first call: client id = device id,
username/password = device id/token, MQTT 3.1.1, clean session off (the broker keeps the
subscriptions and queues the QoS 1 pushes while the device is away: it gets them when it comes
back), keep-alive `keepalive` s. A connection that drops is opened again by the next call (the
calls in between get `TransportError`, which the device counts and retries). At most
`max_connecting` devices connect at the same time (each connect costs the broker an HTTP auth
call to the platform). A refused CONNACK for the credentials is answered `Reply(401)`, as the
HTTP API answers a bad device token, so the device stops; the broker unreachable, or a message
not acknowledged within `timeout` s, is `TransportError`.

What a `Reply` means here. `send_points` answers `202` and `report` `200` once the broker
acknowledged the message (PUBACK): over MQTT that means "the broker has it", not "stored". The
platform's ingest bridge handles it afterwards; a refusal (invalid point, 429 rate limit, a report
on an ended update...) comes back asynchronously on `devices/{id}/errors`, with the HTTP status and
body the same request would have got. This transport keeps those refusals: counted per device
(`device_counters(device_id)["refused_async"]`, summed by the fleet as `refused_async`) and the
last few kept (`refusals(device_id)`). There is no `Idempotency-Key` over MQTT: a message resent
after a lost PUBACK may arrive twice, and the platform stores a point it already has only once.

Firmware. `poll_update` answers from the last offer the platform pushed on `devices/{id}/ota`:
`200` and the offer, or `204` when there is none (nothing pushed, or a push with an empty payload,
`null`, or an object without `update_id`: the platform withdrew the update). A device that
connects after the push (a fresh session, or one the broker expired) would never hear of it, so
the first poll after each connect also asks `GET /firmware/device/update` over HTTP, once; a push
received while that request was in flight wins over its answer. So does the first poll after a
report was refused for good (a 4xx other than 429 on `errors` for `ota/status`: the update was
cancelled or ended meanwhile, which the platform does not push): the offer in hand is stale, and
the platform's answer (`204`, say) lets the device drop it, as it would over HTTP. `install_allowed` is recomputed
at each poll from the offer's `maintenance_window` (the platform's own rule: inside the window, or
always without one), as a device must do with an offer pushed before its window opened.
Artifacts are downloaded over HTTP with the device token (`http.download`).
"""

import asyncio
import logging
import ssl
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiomqtt
import orjson

from iot.simulator.client import HttpTransport
from iot.simulator.transport import DeviceIdentity, Download, Reply, Transport, TransportError

logger = logging.getLogger(__name__)

ONLINE = b'{"status":"online"}'
OFFLINE = b'{"status":"offline"}'
QOS = 1
# CONNACK refusals that mean "these credentials are not accepted": MQTT 3.1.1 return codes 4 and 5,
# which paho reports as the MQTT 5 reason codes 134 and 135.
_CREDENTIALS_REFUSED = {4, 5, 134, 135}
# Refusals kept per device for `refusals()` (all are counted).
REFUSALS_KEPT = 20


def topic(device_id: str, kind: str) -> str:
    """`devices/{id}/{kind}`, kind one of telemetry, ota/status, status, ota, errors."""
    return f"devices/{device_id}/{kind}"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def broker_address_parse(url: str) -> BrokerAddress:
    """`mqtt://host[:1883]` or `mqtts://host[:8883]` (also `tcp://`, `ssl://`); ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ValueError(f"the MQTT URL must be mqtt://host:port or mqtts://host:port, not {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"the MQTT URL {url!r} has a bad port") from exc
    return BrokerAddress(host=parts.hostname, port=port, tls=tls)


class _CredentialsRefused(Exception):
    def __init__(self, reply: Reply):
        super().__init__(reply.body)
        self.reply = reply


@dataclass
class _Link:
    """One connection of one device; `lost` is set once it is gone (the next call opens another)."""

    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task | None = None
    synced: bool = False  # the HTTP look-up for an offer pushed before this connection is done


@dataclass
class _DeviceState:
    """What the transport knows of one device, across its connections."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    link: _Link | None = None
    offer: dict | None = None
    pushes: int = 0  # messages received on devices/{id}/ota
    stale: bool = False  # a report was refused for good: ask the platform for the offer again
    refused: int = 0
    refused_by_status: Counter = field(default_factory=Counter)
    recent_refusals: deque = field(default_factory=lambda: deque(maxlen=REFUSALS_KEPT))


def _datetime(value) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def install_allowed_now(offer: dict, *, now: datetime | None = None) -> bool:
    """Inside the offer's maintenance window, or always without one (as the platform decides it);
    the offer's own `install_allowed` when its window can't be read."""
    window = offer.get("maintenance_window")
    if not window:
        return bool(offer.get("install_allowed", True))
    start = _datetime(window.get("start")) if isinstance(window, dict) else None
    end = _datetime(window.get("end")) if isinstance(window, dict) else None
    if start is None or end is None:
        return bool(offer.get("install_allowed", True))
    now = now or datetime.now(UTC)
    return start <= now < end


class MqttTransport(Transport):
    """The device topics over MQTT, one broker connection per device; HTTP for artifacts and the
    offer a device missed while disconnected. See the module docstring for what a reply means."""

    def __init__(
        self,
        url: str,
        *,
        http: HttpTransport,
        timeout: float = 15.0,
        keepalive: int = 60,
        max_connecting: int = 32,
    ):
        self.address = broker_address_parse(url)
        self.url = url
        self.http = http
        self.timeout = timeout
        self.keepalive = keepalive
        self.max_connecting = max_connecting
        self.connects = 0  # connections opened (more than the devices: reconnections)
        self.connect_failures = 0
        self._states: dict[str, _DeviceState] = {}
        self._connecting: asyncio.Semaphore | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._closed = False

    # ------------------------------------------------------------ connections

    def _state(self, device_id: str) -> _DeviceState:
        state = self._states.get(device_id)
        if state is None:
            state = self._states[device_id] = _DeviceState()
        return state

    async def _connect(self, device: DeviceIdentity) -> _Link:
        state = self._state(device.id)
        link = state.link
        if link is not None and not link.lost.is_set():
            return link
        async with state.lock:
            link = state.link
            if link is not None and not link.lost.is_set():
                return link
            if link is not None:
                await self._close_link(link)
                state.link = None
            if self._closed:
                raise TransportError("the MQTT transport is closed")
            if self._connecting is None:
                self._connecting = asyncio.Semaphore(self.max_connecting)
            async with self._connecting:
                try:
                    link = await self._open(device, state)
                except (TransportError, _CredentialsRefused):
                    self.connect_failures += 1
                    raise
            self.connects += 1
            state.link = link
            return link

    async def _open(self, device: DeviceIdentity, state: _DeviceState) -> _Link:
        if self.address.tls and self._tls_context is None:
            self._tls_context = ssl.create_default_context()
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=device.id,
            password=device.token,
            identifier=device.id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
            will=aiomqtt.Will(topic(device.id, "status"), OFFLINE, qos=QOS),
            keepalive=self.keepalive,
            timeout=self.timeout,
            tls_context=self._tls_context if self.address.tls else None,
        )
        where = f"MQTT broker {self.address.host}:{self.address.port}"
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            code = getattr(exc.rc, "value", exc.rc)
            if code in _CREDENTIALS_REFUSED:
                raise _CredentialsRefused(
                    Reply(401, {"detail": f"{where} refused the device's credentials: {exc}"})
                ) from exc
            raise TransportError(f"{where}: {exc}") from exc
        except aiomqtt.MqttError as exc:
            raise TransportError(f"{where}: {exc}") from exc
        link = _Link(client=client)
        link.reader = asyncio.create_task(self._read(device.id, state, link))
        try:
            await client.subscribe([(topic(device.id, "ota"), QOS), (topic(device.id, "errors"), QOS)])
            await self._publish(link, topic(device.id, "status"), ONLINE)
        except (aiomqtt.MqttError, TransportError) as exc:
            await self._close_link(link)
            raise TransportError(f"{where}: {exc}") from exc
        return link

    async def _read(self, device_id: str, state: _DeviceState, link: _Link) -> None:
        try:
            async for message in link.client.messages:
                self._on_message(device_id, state, str(message.topic), message.payload)
        except aiomqtt.MqttError as exc:
            if not self._closed:
                logger.info("MQTT connection of device %s lost: %s", device_id, exc)
        finally:
            link.lost.set()

    async def _close_link(self, link: _Link) -> None:
        link.lost.set()
        try:
            async with asyncio.timeout(self.timeout):
                await link.client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, TimeoutError, OSError):
            pass
        if link.reader is not None:
            link.reader.cancel()
            await asyncio.gather(link.reader, return_exceptions=True)

    async def _publish(self, link: _Link, topic_name: str, payload: bytes) -> None:
        """Publish at QoS 1 and return once the broker acknowledged it; `TransportError` if the
        connection is lost first or no PUBACK came within `timeout` s."""
        publish = asyncio.ensure_future(link.client.publish(topic_name, payload, qos=QOS, timeout=self.timeout))
        lost = asyncio.ensure_future(link.lost.wait())
        try:
            await asyncio.wait((publish, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not publish.done():
                publish.cancel()
                await asyncio.gather(publish, return_exceptions=True)
        if publish.cancelled():
            raise TransportError(f"publish to {topic_name}: the connection was lost before the broker's PUBACK")
        try:
            publish.result()
        except aiomqtt.MqttError as exc:
            raise TransportError(f"publish to {topic_name}: {exc}") from exc

    # --------------------------------------------------------------- pushes

    def _on_message(self, device_id: str, state: _DeviceState, topic_name: str, payload: bytes) -> None:
        if topic_name == topic(device_id, "ota"):
            state.pushes += 1
            try:
                offer = orjson.loads(payload) if payload else None
            except orjson.JSONDecodeError:
                logger.warning("device %s: unreadable offer on %s ignored: %r", device_id, topic_name, payload[:200])
                return
            state.offer = offer if isinstance(offer, dict) and offer.get("update_id") else None
        elif topic_name == topic(device_id, "errors"):
            try:
                refusal = orjson.loads(payload)
            except orjson.JSONDecodeError:
                refusal = {"error": payload[:500].decode(errors="replace")}
            if not isinstance(refusal, dict):
                refusal = {"error": refusal}
            state.refused += 1
            status = refusal.get("status")
            state.refused_by_status[status] += 1
            if refusal.get("topic") == topic(device_id, "ota/status") and isinstance(status, int):
                state.stale = state.stale or (400 <= status < 500 and status != 429)
            state.recent_refusals.append(refusal)
            logger.debug("device %s: the platform refused a message: %s", device_id, refusal)

    def refusals(self, device_id: str) -> list[dict]:
        """The last refusals (`{topic, status, error, retry_after?}`) received for a device, oldest first."""
        state = self._states.get(device_id)
        return list(state.recent_refusals) if state else []

    def device_counters(self, device_id: str) -> dict[str, int]:
        state = self._states.get(device_id)
        if state is None:
            return {"refused_async": 0, "offers_pushed": 0}
        return {"refused_async": state.refused, "offers_pushed": state.pushes}

    # ------------------------------------------------------------ the seam

    async def send_points(self, device, points, *, idempotency_key=None) -> Reply:
        # No Idempotency-Key over MQTT: a resent message's points are stored once by the platform anyway.
        try:
            link = await self._connect(device)
        except _CredentialsRefused as refused:
            return refused.reply
        body = points[0] if len(points) == 1 else {"points": points}
        await self._publish(link, topic(device.id, "telemetry"), orjson.dumps(body))
        return Reply(202)

    async def poll_update(self, device) -> Reply:
        try:
            link = await self._connect(device)
        except _CredentialsRefused as refused:
            return refused.reply
        state = self._state(device.id)
        if not link.synced or state.stale:
            pushes_before = state.pushes
            reply = await self.http.poll_update(device)
            if reply.status not in (200, 204):
                return reply  # refused for now, or for good: the device decides; asked again next poll
            link.synced, state.stale = True, False
            if state.pushes == pushes_before:
                state.offer = reply.body if reply.status == 200 and isinstance(reply.body, dict) else None
        if state.offer is None:
            return Reply(204)
        return Reply(200, {**state.offer, "install_allowed": install_allowed_now(state.offer)})

    async def report(self, device, update_id, report) -> Reply:
        try:
            link = await self._connect(device)
        except _CredentialsRefused as refused:
            return refused.reply
        await self._publish(link, topic(device.id, "ota/status"), orjson.dumps({"update_id": update_id, **report}))
        return Reply(200)

    async def download(self, device, url) -> Download:
        return await self.http.download(device, url)

    async def aclose(self) -> None:
        """Say goodbye (`offline`) on every open connection, disconnect, close the HTTP client."""
        self._closed = True
        links = [(device_id, state.link) for device_id, state in self._states.items() if state.link is not None]
        await asyncio.gather(*(self._goodbye(device_id, link) for device_id, link in links), return_exceptions=True)
        for state in self._states.values():
            state.link = None
        await self.http.aclose()

    async def _goodbye(self, device_id: str, link: _Link) -> None:
        if not link.lost.is_set():
            try:
                await self._publish(link, topic(device_id, "status"), OFFLINE)
            except TransportError:
                pass
        await self._close_link(link)
