"""The simulator's MQTT transport against a real broker: what it publishes (topic, JSON), what it makes of
what it is pushed, and how it fails.

Every test runs on an amqtt broker started in this process (the broker software the platform embeds; an
account per username, no ACL), and again on the Mosquitto of the development machines (127.0.0.1:1883,
anonymous, no ACL) when one answers there. A watcher client subscribed to `devices/{id}/#` sees what a
device publishes, and plays the platform's side (the offer on `devices/{id}/ota`, refusals on
`devices/{id}/errors`). The HTTP half (the look-up at connect) is an `httpx.MockTransport`.
"""

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from io import StringIO

import aiomqtt
import httpx
import orjson
import pytest
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from django.core.management import CommandError, call_command

from iot.simulator.client import HttpTransport
from iot.simulator.fleet import FleetSimulator, run_coroutine
from iot.simulator.mqtt_transport import MqttTransport, broker_address_parse, install_allowed_now
from iot.simulator.transport import DeviceIdentity, Reply, TransportError

MOSQUITTO = ("127.0.0.1", 1883)
MOSQUITTO_URL = "mqtt://127.0.0.1:1883"
BAD_TOKEN = "refused-token"
POINT = {"timestamp": "2024-01-01T00:00:00.000Z", "metric": "temperature", "value": 21.5}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class RefuseBadTokenPlugin(BaseAuthPlugin):
    """Any username with any password but BAD_TOKEN (the platform's broker asks POST /mqtt/auth instead)."""

    async def authenticate(self, *, session) -> bool:
        return bool(session.username) and session.password != BAD_TOKEN


class ThreadedBroker:
    """An amqtt broker on its own event loop in a thread, on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="test-amqtt-broker", daemon=True)

    def _run(self) -> None:
        async def main():
            broker = Broker(
                {
                    "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                    "plugins": {f"{__name__}.RefuseBadTokenPlugin": {}},
                }
            )
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await broker.start()
            self._ready.set()
            await self._stop.wait()
            await broker.shutdown()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()

    def start(self) -> "ThreadedBroker":
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"the test broker did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def broker_url(request):
    if request.param == "mosquitto":
        if not reachable(*MOSQUITTO):
            pytest.skip("no Mosquitto on 127.0.0.1:1883 (these tests also run on the in-process amqtt broker)")
        yield MOSQUITTO_URL
        return
    broker = ThreadedBroker().start()
    try:
        yield broker.url
    finally:
        broker.stop()


def new_device(token: str = "device-token") -> DeviceIdentity:
    return DeviceIdentity(id=str(uuid.uuid4()), serial_number=f"SIM-{uuid.uuid4().hex[:6]}", token=token)


class FakePlatform:
    """The HTTP half: answers GET /firmware/device/update with `offer` (None: 204), counts the calls."""

    def __init__(self, offer: dict | None = None, status: int | None = None):
        self.offer = offer
        self.status = status
        self.polls = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/firmware/device/update", request.url
        assert request.headers["Authorization"].startswith("Device ")
        self.polls += 1
        if self.status is not None:
            return httpx.Response(self.status, json={"detail": "scripted"}, headers={"Retry-After": "2"})
        return httpx.Response(204) if self.offer is None else httpx.Response(200, json=self.offer)

    def http(self) -> HttpTransport:
        http = HttpTransport("http://platform.test")
        http.client = httpx.AsyncClient(base_url=http.base_url, transport=httpx.MockTransport(self.handler))
        return http


class Watcher:
    """The platform's side of one device's topics: sees what it publishes, pushes to it."""

    def __init__(self, url: str, device: DeviceIdentity):
        address = broker_address_parse(url)
        self.device = device
        self.client = aiomqtt.Client(
            address.host, address.port, username="watcher", password="x", identifier=f"watcher-{uuid.uuid4().hex}"
        )
        self.seen: list[tuple[str, bytes]] = []
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "Watcher":
        await self.client.__aenter__()
        await self.client.subscribe(f"devices/{self.device.id}/#", qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self.client.messages:
                self.seen.append((str(message.topic), message.payload))

    async def __aexit__(self, *exc_info) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.__aexit__(None, None, None)

    async def push(self, kind: str, body) -> None:
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.client.publish(f"devices/{self.device.id}/{kind}", payload, qos=1)

    def published(self, kind: str) -> list:
        """JSON bodies the device published on devices/{id}/{kind}, in order."""
        return [orjson.loads(payload) for topic, payload in self.seen if topic == f"devices/{self.device.id}/{kind}"]


async def until(predicate, *, timeout: float = 10.0, message: str = "condition"):
    """Await until `predicate()` (sync or async) is truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.02)


async def forget_session(url: str, device: DeviceIdentity) -> None:
    """Drop the broker's persistent session of a device (a clean-session connect with its client id)."""
    address = broker_address_parse(url)
    async with aiomqtt.Client(
        address.host, address.port, username=device.id, password=device.token, identifier=device.id, clean_session=True
    ):
        pass


def run(coroutine):
    return run_coroutine(coroutine)  # uvloop, as the fleet runs


# ------------------------------------------------------------------------ what is published


def test_publishes_online_points_batches_reports_and_offline(broker_url):
    device = new_device()
    platform = FakePlatform()

    async def scenario():
        async with Watcher(broker_url, device) as watcher:
            transport = MqttTransport(broker_url, http=platform.http())
            single = await transport.send_points(device, [POINT], idempotency_key="ignored")
            batch = await transport.send_points(device, [POINT, {**POINT, "metric": "humidity", "value": 40}])
            report = await transport.report(device, "u-1", {"status": "installed", "version": "2.0.0"})
            await until(lambda: len(watcher.seen) >= 4, message="four messages")
            await transport.aclose()
            await until(lambda: watcher.published("status")[-1:] == [{"status": "offline"}], message="offline")
            return single, batch, report, transport, watcher

    single, batch, report, transport, watcher = run(scenario())
    assert (single, batch, report) == (Reply(202), Reply(202), Reply(200))
    assert watcher.published("status") == [{"status": "online"}, {"status": "offline"}]
    # A point as the body of POST /telemetry/point, several as /telemetry/batch; the topic names the device.
    assert watcher.published("telemetry") == [
        POINT,
        {"points": [POINT, {**POINT, "metric": "humidity", "value": 40}]},
    ]
    assert watcher.published("ota/status") == [{"update_id": "u-1", "status": "installed", "version": "2.0.0"}]
    # online comes first: it is published at connect, before the device's first message
    assert watcher.seen[0] == (f"devices/{device.id}/status", b'{"status":"online"}')
    assert transport.connects == 1 and platform.polls == 0  # no HTTP without a poll
    run(forget_session(broker_url, device))


# -------------------------------------------------------------------------- offers pushed


def test_a_pushed_offer_is_what_poll_update_answers_until_withdrawn(broker_url):
    device = new_device()
    platform = FakePlatform(offer=None)
    offer = {
        "update_id": str(uuid.uuid4()),
        "from_version": "1.0.0",
        "to_version": "2.0.0",
        "status": "pending",
        "progress": 0,
        "artifact_url": "/firmware/versions/2.0.0/artifact",
        "checksum": "sha256:" + "ab" * 32,
        "sha256": "ab" * 32,
        "size_bytes": 10,
        "install_allowed": True,
        "maintenance_window": None,
    }

    async def scenario():
        async with Watcher(broker_url, device) as watcher:
            transport = MqttTransport(broker_url, http=platform.http())
            replies = [await transport.poll_update(device)]  # connects; HTTP says nothing is waiting
            await watcher.push("ota", offer)
            replies.append(await until(lambda: _ok(transport.poll_update(device)), message="the pushed offer"))
            await watcher.push("ota", b"")  # withdrawn
            replies.append(await until(lambda: _status(transport.poll_update(device), 204), message="a 204"))
            counters = transport.device_counters(device.id)
            await transport.aclose()
            return replies, counters

    replies, counters = run(scenario())
    assert replies[0] == Reply(204)
    assert replies[1] == Reply(200, offer)
    assert replies[2] == Reply(204)
    assert platform.polls == 1  # the look-up at connect only; then the pushes
    assert counters == {"refused_async": 0, "offers_pushed": 2}
    run(forget_session(broker_url, device))


async def _ok(reply_coroutine) -> Reply | None:
    reply = await reply_coroutine
    return reply if reply.status == 200 else None


async def _status(reply_coroutine, status: int) -> Reply | None:
    reply = await reply_coroutine
    return reply if reply.status == status else None


def test_an_offer_pushed_before_the_device_connected_comes_from_http_once(broker_url):
    device = new_device()
    offer = {"update_id": str(uuid.uuid4()), "to_version": "2.0.0", "status": "downloaded", "install_allowed": True}
    platform = FakePlatform(offer=offer)

    async def scenario():
        transport = MqttTransport(broker_url, http=platform.http())
        replies = [await transport.poll_update(device) for _ in range(3)]
        await transport.aclose()
        return replies

    assert run(scenario()) == [Reply(200, offer)] * 3
    assert platform.polls == 1
    run(forget_session(broker_url, device))


def test_a_refused_http_look_up_is_passed_on_and_asked_again(broker_url):
    device = new_device()
    platform = FakePlatform(status=503)

    async def scenario():
        transport = MqttTransport(broker_url, http=platform.http())
        first = await transport.poll_update(device)
        platform.status = None
        second = await transport.poll_update(device)
        third = await transport.poll_update(device)
        await transport.aclose()
        return first, second, third

    first, second, third = run(scenario())
    assert first.status == 503 and first.retry_after == 2.0 and first.refused_for_now
    assert second == third == Reply(204)
    assert platform.polls == 2  # asked again after the refusal, then no more
    run(forget_session(broker_url, device))


def test_install_allowed_follows_the_maintenance_window_of_a_pushed_offer():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    window = {"start": "2024-05-01T13:00:00Z", "end": "2024-05-01T14:00:00+00:00", "duration_seconds": 3600}
    offer = {"update_id": "u", "install_allowed": True, "maintenance_window": window}
    assert install_allowed_now(offer, now=now) is False  # pushed with install_allowed true, window not open
    assert install_allowed_now(offer, now=now + timedelta(hours=1, minutes=30)) is True
    assert install_allowed_now(offer, now=now + timedelta(hours=2)) is False  # end excluded
    assert install_allowed_now({"install_allowed": False, "maintenance_window": None}, now=now) is False
    assert install_allowed_now({"install_allowed": False, "maintenance_window": {"start": "soon"}}, now=now) is False


# ---------------------------------------------------------------------------- refusals


def test_refusals_on_the_errors_topic_are_counted_also_while_away(broker_url):
    device = new_device()
    refusal = {
        "topic": f"devices/{device.id}/telemetry",
        "status": 429,
        "error": {"detail": "Rate limit exceeded", "code": "rate_limited"},
        "retry_after": 3.0,
    }

    async def scenario():
        async with Watcher(broker_url, device) as watcher:
            transport = MqttTransport(broker_url, http=FakePlatform().http())
            assert await transport.send_points(device, [POINT]) == Reply(202)
            await watcher.push("errors", refusal)
            await until(lambda: transport.device_counters(device.id)["refused_async"] == 1, message="a refusal")
            await watcher.push("errors", b"not json")
            await until(lambda: transport.device_counters(device.id)["refused_async"] == 2, message="two")
            await transport.aclose()
            # Away: the persistent session keeps what is pushed at QoS 1 for the device's return.
            await watcher.push("errors", {**refusal, "status": 400})
            again = MqttTransport(broker_url, http=FakePlatform().http())
            await again.send_points(device, [POINT])
            await until(lambda: again.device_counters(device.id)["refused_async"] == 1, message="the queued one")
            await again.aclose()
            return transport.refusals(device.id), again.refusals(device.id)

    first, second = run(scenario())
    assert first[0] == refusal and first[1] == {"error": "not json"}
    assert [r["status"] for r in second] == [400]
    run(forget_session(broker_url, device))


def test_a_report_refused_for_good_makes_the_next_poll_ask_the_platform_again(broker_url):
    """The platform pushes no withdrawal when an update is cancelled: the refusal of a report tells the device."""
    device = new_device()
    offer = {"update_id": str(uuid.uuid4()), "to_version": "2.0.0", "status": "downloaded", "install_allowed": True}
    platform = FakePlatform(offer=offer)
    ota_status = f"devices/{device.id}/ota/status"

    async def scenario():
        async with Watcher(broker_url, device) as watcher:
            transport = MqttTransport(broker_url, http=platform.http())
            replies = [await transport.poll_update(device)]
            await transport.report(device, offer["update_id"], {"status": "installing"})
            platform.offer = None  # cancelled meanwhile
            await watcher.push("errors", {"topic": ota_status, "status": 429, "error": {"detail": "later"}})
            await until(lambda: transport.device_counters(device.id)["refused_async"] == 1, message="the 429")
            replies.append(await transport.poll_update(device))  # a 429 is no news about the update
            await watcher.push("errors", {"topic": ota_status, "status": 409, "error": {"detail": "cancelled"}})
            await until(lambda: transport.device_counters(device.id)["refused_async"] == 2, message="the 409")
            replies += [await transport.poll_update(device), await transport.poll_update(device)]
            await transport.aclose()
            return replies

    assert run(scenario()) == [Reply(200, offer), Reply(200, offer), Reply(204), Reply(204)]
    assert platform.polls == 2
    run(forget_session(broker_url, device))


# --------------------------------------------------------------------------- failures


def test_an_unreachable_broker_is_a_transport_error():
    device = new_device()

    async def scenario():
        transport = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", http=FakePlatform().http(), timeout=5)
        errors = []
        for call in (
            transport.send_points(device, [POINT]),
            transport.poll_update(device),
            transport.report(device, "u", {"status": "downloading"}),
        ):
            with pytest.raises(TransportError) as caught:
                await call
            errors.append(str(caught.value))
        await transport.aclose()
        return errors, transport.connect_failures

    errors, failures = run(scenario())
    assert all("MQTT broker 127.0.0.1:" in error for error in errors), errors
    assert failures == 3


def test_refused_credentials_answer_401_so_the_device_stops(broker_url):
    if broker_url == MOSQUITTO_URL:
        pytest.skip("the development Mosquitto lets anyone in")
    device = new_device(token=BAD_TOKEN)

    async def scenario():
        transport = MqttTransport(broker_url, http=FakePlatform().http())
        replies = [await transport.send_points(device, [POINT]), await transport.poll_update(device)]
        await transport.aclose()
        return replies

    replies = run(scenario())
    assert [reply.status for reply in replies] == [401, 401]
    assert "refused the device's credentials" in replies[0].body["detail"]


def test_a_dropped_connection_sends_the_last_will_and_the_next_call_reconnects(broker_url):
    device = new_device()

    async def scenario():
        async with Watcher(broker_url, device) as watcher:
            transport = MqttTransport(broker_url, http=FakePlatform().http())
            await transport.send_points(device, [POINT])
            link = transport._states[device.id].link
            link.client._client.socket().shutdown(socket.SHUT_RDWR)  # the network goes away under the device
            await until(lambda: link.lost.is_set(), message="the loss noticed")
            await until(lambda: {"status": "offline"} in watcher.published("status"), message="the last will")
            reply = await transport.send_points(device, [POINT])
            await until(lambda: len(watcher.published("telemetry")) == 2, message="the second point")
            await transport.aclose()
            return reply, transport.connects, watcher.published("status")

    reply, connects, statuses = run(scenario())
    assert reply == Reply(202) and connects == 2
    assert statuses[:3] == [{"status": "online"}, {"status": "offline"}, {"status": "online"}]
    run(forget_session(broker_url, device))


# ------------------------------------------------------------------------ fleet, command


@pytest.mark.parametrize(
    ("options", "message"),
    [({}, "needs mqtt_url"), ({"mqtt_url": "http://127.0.0.1:1883"}, "mqtt://host:port")],
)
def test_the_fleet_refuses_mqtt_without_a_broker_url(options, message):
    with pytest.raises(ValueError, match=message):
        FleetSimulator(base_url="http://x", operator_token="t", transport="mqtt", **options)


def test_the_fleet_makes_an_mqtt_transport():
    fleet = FleetSimulator(base_url="http://x", operator_token="t", transport="mqtt", mqtt_url="mqtt://broker:1884")

    async def make():
        transport = fleet._make_transport()
        await transport.http.aclose()
        return transport

    transport = run(make())
    assert isinstance(transport, MqttTransport)
    assert (transport.address.host, transport.address.port, transport.address.tls) == ("broker", 1884, False)
    assert transport.http.base_url == "http://x"
    assert "refused-async=0" in fleet.stats().summary_line()


def test_the_command_needs_a_broker_url_for_mqtt(settings):
    settings.MQTT_URL = ""
    with pytest.raises(CommandError, match="--transport mqtt needs --mqtt-url"):
        call_command("simulate_fleet", "--token", "t", "--transport", "mqtt", stdout=StringIO(), stderr=StringIO())
