"""amqtt's broker, with what the platform relies on made to hold (each found by experiment with amqtt 0.12.1,
and tested in `mqtt/tests/test_broker_live.py`).

**A QoS 1 message is delivered until it is acknowledged** (the "a bridge killed mid-stream loses
nothing" guarantee). amqtt dropped an outgoing QoS 1 message from the session as soon as its
connection ended, or 5 s after it was sent without a PUBACK: a subscriber SIGKILLed between
receiving a message and acknowledging it never got it again. Here (`_Handler`) the message stays in
the session's in-flight set until its PUBACK, however long that takes and across connections, and
is sent again (DUP set) when the session's client id reconnects (MQTT 3.1.1 §4.4). A connection
has at most `max_inflight` unacknowledged messages (the rest wait in the broker, in order), so a
slow subscriber is not flooded and packet ids never run out.

**A message the broker acknowledged is routed**, even when its publisher disconnects right after:
amqtt sent the PUBACK on receipt and stopped routing the client's queued messages at its
disconnect, so a device publishing a burst and disconnecting lost most of it (`_client_message_loop`).

**Messages for a disconnected persistent session are queued** (amqtt did this), and are now
replayed through the same in-flight window, after the re-sent in-flight ones, with the RETAIN
flag off (amqtt set it, which told a subscriber a queued message was a retained one).

**Shared subscriptions**: `$share/{group}/{filter}` (MQTT 5 §4.8.2, which EMQX, Mosquitto and
HiveMQ accept from 3.1.1 clients too), absent from amqtt. Each message matching `filter` goes to
ONE member session of the group: round robin among the connected members, or, when none is
connected, one of the disconnected persistent members (queued for its return). So several
bridges split the load. A message in flight to a member that dies stays with that member's
session (re-sent when it reconnects), it does not move to another member.

**Authentication happens before anything else**. amqtt, on a CONNECT, first deleted the session
of the same client id (clean session) or took it over (kicking its connection off), and only then
asked the authentication plugins: anyone who knew a client id could wipe the bridge's session,
and its queued messages, without a password. Here the CONNECT is authenticated first; a refused
one touches nothing. A persistent session also never passes to another username: its
subscriptions were authorized for its owner, so another user's client with the same id starts
a new session. An existing connection of the same client id is taken over cleanly (the old
connection has ended, and its session is marked disconnected, before the new one starts: amqtt
marked the resumed session disconnected behind the new connection's back).

**A last will is checked like a publish** at CONNECT (amqtt published it unchecked: a device could
have made another device's telemetry its will); one the client may not publish refuses the CONNECT.

**A reconnecting client gets retained messages of its own subscriptions only** (amqtt sent it
those of every filter any client had subscribed to: another device's retained status, say).

QoS 2 subscriptions are granted QoS 1, the level the platform guarantees end to end.

Everything lives in memory, in one process: a broker restart loses its sessions, subscriptions and
queued messages (clients reconnect and subscribe again; what it had accepted from devices and not
yet delivered to a bridge is lost). Use EMQX where that matters (docs/MQTT.md).
"""

import asyncio
import logging
from collections import deque
from typing import Any

from amqtt.broker import AMQTT_MAGIC_VALUE_RET_SUBSCRIBED, Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import OUTGOING, ApplicationMessage, Session
from amqtt.utils import gen_client_id

logger = logging.getLogger(__name__)

SHARE_PREFIX = "$share/"
# Per-session state kept in amqtt's `Session.attributes`.
OWNER = "iot.mqtt.owner"  # the username that made the session
WINDOW = "iot.mqtt.window"  # asyncio.Semaphore: unacknowledged QoS 1/2 messages sent to it, at most max_inflight
DISCONNECTED = "iot.mqtt.disconnected"  # asyncio.Event set once a taken-over connection has ended
DEFAULT_MAX_INFLIGHT = 32  # EMQX's default max_inflight
TAKEOVER_TIMEOUT_SECONDS = 5.0
_CONNECT_FIELDS = (
    "will_flag",
    "will_message",
    "will_topic",
    "will_qos",
    "will_retain",
    "keep_alive",
    "username",
    "password",
)


def shared_subscription(topic_filter: str) -> tuple[str, str] | None:
    """`$share/{group}/{filter}` -> (group, filter); None for a plain filter or a malformed shared one."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, _, real_filter = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group or not real_filter or any(c in group for c in "+#"):
        return None
    return group, real_filter


class _Handler(BrokerProtocolHandler):
    """Outgoing QoS 1 messages leave the session only with their PUBACK."""

    stopped = False

    async def stop(self) -> None:
        self.stopped = True
        await super().stop()

    async def _handle_qos1_message_flow(self, app_message) -> None:
        if app_message.direction != OUTGOING:
            return await super()._handle_qos1_message_flow(app_message)
        session, packet_id = self.session, app_message.packet_id
        session.inflight_out[packet_id] = app_message  # until its PUBACK, on this connection or a later one
        packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        waiter = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter  # before sending: a fast PUBACK must find it
        try:
            await self._send_packet(packet)
            app_message.publish_packet = packet
            if self.stopped:
                return  # the connection is gone: re-sent when the session reconnects
            app_message.puback_packet = await waiter  # cancelled when the connection ends: the message stays
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        session.inflight_out.pop(packet_id, None)

    async def handle_puback(self, puback: PubackPacket) -> None:
        packet_id = puback.variable_header.packet_id if puback.variable_header else None
        if packet_id is not None and packet_id not in self._puback_waiters and self.session is not None:
            # The PUBACK of a message re-sent at reconnect after its re-send stopped waiting (amqtt gives
            # the re-sends 10 s): the message is acknowledged all the same.
            self.session.inflight_out.pop(packet_id, None)
            return
        await super().handle_puback(puback)


class IotBroker(Broker):
    def __init__(self, config: dict[str, Any], *, max_inflight: int = DEFAULT_MAX_INFLIGHT) -> None:
        super().__init__(config)
        self.max_inflight = max_inflight
        self._deliveries: set[asyncio.Task] = set()
        self._share_cursor: dict[str, int] = {}

    # --- connecting: authenticate first, then find or make the session -------------------------------

    async def _initialize_client_session(self, reader, writer, remote_address: str, remote_port: int):
        try:
            handler, incoming = await _Handler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        if not await super()._authenticate(incoming, None):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"{remote_address}:{remote_port} (username {incoming.username!r}) refused")
        if incoming.will_flag and not await self._topic_filtering(incoming, incoming.will_topic, Action.PUBLISH):
            # amqtt publishes a last will without asking: a device could have set another device's topic.
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"{remote_address}:{remote_port}: last will on {incoming.will_topic!r} not allowed")
        incoming.attributes[OWNER] = incoming.username
        client_id = incoming.client_id
        existing = self._sessions.get(client_id, (None, None))[0] if client_id else None
        if existing is not None:
            if existing.transitions.is_connected():
                await self._take_over(existing)
            if incoming.clean_session or existing.attributes.get(OWNER) != incoming.username:
                await self._cleanup_session(client_id)  # its subscriptions, queue and in-flight messages go
                existing = None
        if existing is None:
            if not client_id:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
            session = incoming
        else:
            for name in _CONNECT_FIELDS:  # what a new CONNECT brings to a resumed session
                setattr(existing, name, getattr(incoming, name))
            existing.attributes.update({k: v for k, v in incoming.attributes.items() if k != WINDOW})
            existing.parent = 1
            session = existing
        if session.keep_alive > 0:
            session.keep_alive += self.config.timeout_disconnect_delay or 0
        session.attributes[WINDOW] = asyncio.Semaphore(self.max_inflight)
        return handler, session

    async def _authenticate(self, session: Session, _listener: ListenerConfig) -> bool:
        # Done in _initialize_client_session, before any session was touched; a refused CONNECT never gets here.
        return True

    async def _take_over(self, session: Session) -> None:
        """End the connection that holds `session` and wait until its loop marked the session disconnected."""
        ended = asyncio.Event()
        session.attributes[DISCONNECTED] = ended
        old = self._get_handler(session)
        if old is not None:
            await old.handle_connection_closed()
        try:
            await asyncio.wait_for(ended.wait(), TAKEOVER_TIMEOUT_SECONDS)
        except TimeoutError:
            logger.warning("MQTT client %s: the connection taken over did not end; forcing it", session.client_id)
            if old is not None:
                await self._stop_handler(old)
            if session.transitions.is_connected():
                session.transitions.disconnect()

    async def _client_message_loop(self, client_session: Session, handler) -> None:
        await super()._client_message_loop(client_session, handler)
        # amqtt acknowledges a QoS 1 PUBLISH on receipt (PUBACK) and queues it; its loop then checks and
        # routes the queue one message at a time (the topic check is an HTTP round trip), and stopped at the
        # disconnect, dropping what was still queued: acknowledged messages, lost (a device publishing a burst
        # and disconnecting lost up to 8 in 10). They are routed now, the connection gone or not.
        queue = client_session.delivered_message_queue
        while not queue.empty():
            done = asyncio.get_running_loop().create_future()
            done.set_result(queue.get_nowait())
            await self._handle_message_delivery(client_session, handler, done)

    async def _handle_disconnect(self, client_session: Session, handler, disconnect_waiter) -> None:
        current_session, current_handler = self._sessions.get(client_session.client_id, (None, None))
        if current_session is client_session and current_handler is handler:
            await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        else:  # a connection taken over late, or whose session was deleted: the session is not its own any more
            await self._stop_handler(handler)
        ended = client_session.attributes.pop(DISCONNECTED, None)
        if ended is not None:
            ended.set()

    # --- subscribing -------------------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        if topic_filter.startswith(SHARE_PREFIX) and shared_subscription(topic_filter) is None:
            return AMQTT_MAGIC_VALUE_RET_SUBSCRIBED  # malformed: `$share/{group}/{filter}`
        return await super().add_subscription((topic_filter, min(qos, QOS_1)), session)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session):
        if any(s is session for s, _ in self._subscriptions.get(subscription[0], ())):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    # --- delivering --------------------------------------------------------------------------------

    async def _run_broadcast(self, running_tasks: deque) -> None:
        """One published message to every subscription it matches (one member per shared group)."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for topic_filter, subscriptions in list(self._subscriptions.items()):  # a copy: nothing changes it under us
            shared = shared_subscription(topic_filter)
            if not subscriptions or not self._matches(topic, shared[1] if shared else topic_filter):
                continue
            targets = self._shared_member(topic_filter, subscriptions) if shared else subscriptions
            for session, sub_qos in targets:
                self._deliver(session, topic, broadcast["data"], broadcast.get("qos", sub_qos))

    def _shared_member(self, topic_filter: str, members: list[tuple[Session, int]]) -> list[tuple[Session, int]]:
        pool = [m for m in members if m[0].transitions.state == "connected"]
        pool = pool or [m for m in members if not m[0].clean_session and not m[0].is_anonymous]
        if not pool:
            return []
        turn = self._share_cursor.get(topic_filter, 0)
        self._share_cursor[topic_filter] = turn + 1
        return [pool[turn % len(pool)]]

    def _deliver(self, session: Session, topic: str, data: bytes, qos: int) -> None:
        task = asyncio.ensure_future(self._deliver_one(session, topic, data, qos))
        self._deliveries.add(task)
        task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("MQTT delivery failed: %r", task.exception())

    async def _deliver_one(self, session: Session, topic: str, data: bytes, qos: int) -> None:
        """Send now if the session is connected and its window has room (waiting for room, in order),
        else queue it for the session's next connection (persistent sessions, QoS 1)."""
        window = session.attributes.get(WINDOW)
        if qos == QOS_0 or window is None:
            await self._send_or_queue(session, topic, data, qos)
            return
        async with window:
            await self._send_or_queue(session, topic, data, qos)

    async def _send_or_queue(self, session: Session, topic: str, data: bytes, qos: int) -> None:
        current, handler = self._sessions.get(session.client_id, (None, None))
        if current is not session:
            return  # the session was deleted (clean session, expiry): its messages go with it
        if session.transitions.state == "connected" and handler is not None and not getattr(handler, "stopped", False):
            await handler.mqtt_publish(topic, data, qos, retain=False)
        elif not session.clean_session and qos > QOS_0 and not session.is_anonymous:
            await self._retain_broadcast_message({"session": None, "topic": topic, "data": data}, qos, session)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """The messages queued while the session was away, in order, through its window, RETAIN off."""
        while not session.retained_messages.empty():
            queued: ApplicationMessage = session.retained_messages.get_nowait()
            self._deliver(session, queued.topic, queued.data, queued.qos)

    async def shutdown(self) -> None:
        await super().shutdown()
        for task in list(self._deliveries):
            task.cancel()
