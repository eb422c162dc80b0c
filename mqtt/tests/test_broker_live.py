"""The embedded MQTT broker of the live platform (`python -m mqtt.broker`, asking the web's /mqtt/auth and
/mqtt/acl), with real clients (paho): who may connect, which topics a device may use, and the three broker
behaviours the platform relies on (persistent sessions keep QoS 1 messages; an unacknowledged message is
delivered again after its subscriber was SIGKILLed; shared subscriptions split the messages)."""

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from django.conf import settings

from iot.testing.live import metric_value, register_device
from iot.testing.processes import REPO_ROOT, Platform, free_port, start_mqtt_broker, wait_until
from iot.testing.telemetry import point_body
from mqtt import topics
from mqtt.testing import MqttRefused, mqtt_session

pytestmark = pytest.mark.live


def bridge(platform, **options):
    """A session of the platform's own account (a superuser: any topic)."""
    return mqtt_session(
        platform.mqtt_url,
        username=settings.MQTT_BRIDGE_USERNAME,
        password=platform.env["MQTT_BRIDGE_PASSWORD"],
        **options,
    )


def as_device(platform, device: dict, **options):
    return mqtt_session(platform.mqtt_url, username=device["id"], password=device["device_token"], **options)


def payloads(messages) -> list[str]:
    return [message.payload.decode() for message in messages]


# --- who may connect ---------------------------------------------------------------------------------


def test_a_device_connects_with_its_token_and_anything_else_is_refused(api, platform):
    device = register_device(api, "SN-MQTT-LOGIN")
    refused_before = metric_value(api, "iot_mqtt_auth_total", result="deny")
    with as_device(platform, device):
        pass
    other = register_device(api, "SN-MQTT-LOGIN")
    for username, password in [
        (device["id"], device["device_token"] + "x"),
        (device["id"], other["device_token"]),  # a real token, of another device
        (device["id"], None),
        ("not-a-device-id", device["device_token"]),
        (settings.MQTT_BRIDGE_USERNAME, "not-the-bridge-password"),
        (None, None),  # anonymous
    ]:
        with (
            pytest.raises(MqttRefused, match="Not authorized"),
            mqtt_session(platform.mqtt_url, username=username, password=password),
        ):
            pass
    # Each refusal but the anonymous one (refused by the broker without asking) was an answer of /mqtt/auth.
    assert metric_value(api, "iot_mqtt_auth_total", result="deny") >= refused_before + 5


def test_a_decommissioned_device_can_no_longer_connect(api, platform):
    device = register_device(api, "SN-MQTT-DECOM")
    with as_device(platform, device):
        pass
    assert api.patch(f"/devices/{device['id']}", json={"status": "decommissioned"}).status_code == 200
    with pytest.raises(MqttRefused), as_device(platform, device):
        pass


def test_a_last_will_on_another_devices_topic_is_refused_at_connect(api, platform):
    device, victim = register_device(api, "SN-MQTT-WILL"), register_device(api, "SN-MQTT-WILL")
    own_will = (topics.device_topic(device["id"], topics.STATUS), b'{"status": "offline"}')
    with as_device(platform, device, will=own_will):
        pass
    forged = (topics.device_topic(victim["id"], topics.TELEMETRY), orjson.dumps(point_body(victim["id"])))
    with pytest.raises(MqttRefused), as_device(platform, device, will=forged):
        pass


# --- which topics a device may use ------------------------------------------------------------------


def test_a_device_cannot_publish_to_another_devices_telemetry(api, platform):
    device, victim = register_device(api, "SN-MQTT-PUB"), register_device(api, "SN-MQTT-PUB")
    own_topic = topics.device_topic(device["id"], topics.TELEMETRY)
    victim_topic = topics.device_topic(victim["id"], topics.TELEMETRY)
    with bridge(platform) as watcher, as_device(platform, device) as publisher:
        assert watcher.subscribe(victim_topic) == [1]
        assert watcher.subscribe(own_topic) == [1]
        forged = orjson.dumps(point_body(victim["id"]))
        publisher.publish(victim_topic, forged)  # MQTT 3.1.1 has no refusal for a PUBLISH: it is dropped
        publisher.publish(own_topic, orjson.dumps(point_body(device["id"])))
        # One connection's messages are handled in order: had the forged one passed, it would come first.
        (first,) = watcher.take(1)
        assert first.topic == own_topic
        assert watcher.messages.empty()


def test_a_device_cannot_subscribe_to_another_devices_ota(api, platform):
    device, victim = register_device(api, "SN-MQTT-SUB"), register_device(api, "SN-MQTT-SUB")
    own_ota = topics.device_topic(device["id"], topics.OTA)
    with as_device(platform, device) as listener, bridge(platform) as server:
        assert listener.subscribe(topics.device_topic(victim["id"], topics.OTA)) == [0x80]
        assert listener.subscribe("devices/+/ota") == [0x80]
        assert listener.subscribe("#") == [0x80]
        assert listener.subscribe(f"devices/{device['id']}/#") == [0x80]
        assert listener.subscribe(own_ota) == [1]
        assert listener.subscribe(topics.device_topic(device["id"], topics.ERRORS)) == [1]
        server.publish(topics.device_topic(victim["id"], topics.OTA), b'{"for": "the victim"}')
        server.publish(own_ota, b'{"for": "the device"}')
        (first,) = listener.take(1)
        assert (first.topic, first.payload) == (own_ota, b'{"for": "the device"}')
        assert listener.messages.empty()


# --- sessions: only their owner, after authenticating, may take them over ---------------------------


def test_a_refused_connect_with_a_sessions_client_id_leaves_that_session_alone(platform):
    topic, client_id = f"test/{uuid.uuid4().hex}/guarded", f"guarded-{uuid.uuid4().hex[:8]}"
    with bridge(platform) as publisher:
        with bridge(platform, client_id=client_id, clean_session=False) as owner:
            assert owner.subscribe(topic) == [1]
            for clean_session in (True, False):  # amqtt deleted, or took over, the session before asking
                with (
                    pytest.raises(MqttRefused),
                    mqtt_session(
                        platform.mqtt_url,
                        username="not-a-device",
                        password="x",
                        client_id=client_id,
                        clean_session=clean_session,
                    ),
                ):
                    pass
            publisher.publish(topic, b"still-connected")
            assert payloads(owner.take(1)) == ["still-connected"]
            assert not owner.disconnected.is_set()
        publisher.publish(topic, b"queued")  # the owner is away: kept for it
        with (
            pytest.raises(MqttRefused),
            mqtt_session(
                platform.mqtt_url, username="not-a-device", password="x", client_id=client_id, clean_session=True
            ),
        ):
            pass
        with bridge(platform, client_id=client_id, clean_session=False) as owner:
            assert owner.session_present
            assert payloads(owner.take(1)) == ["queued"]


def test_a_persistent_session_never_passes_to_another_login(api, platform):
    device, intruder = register_device(api, "SN-MQTT-SESSION"), register_device(api, "SN-MQTT-SESSION")
    client_id, ota = f"shared-{uuid.uuid4().hex[:8]}", topics.device_topic(device["id"], topics.OTA)
    with as_device(platform, device, client_id=client_id, clean_session=False) as owner:
        assert owner.subscribe(ota) == [1]
    with as_device(platform, intruder, client_id=client_id, clean_session=False) as other, bridge(platform) as server:
        assert not other.session_present  # a new session: the device's subscription is not its to inherit
        server.publish(ota, b'{"for": "the device"}')
        own_errors = topics.device_topic(intruder["id"], topics.ERRORS)
        assert other.subscribe(own_errors) == [1]
        server.publish(own_errors, b"control")
        assert payloads(other.take(1)) == ["control"]  # had the OTA offer reached it, it would have come first


def test_a_takeover_hands_the_session_to_the_new_connection(platform):
    topic, client_id = f"test/{uuid.uuid4().hex}/takeover", f"takeover-{uuid.uuid4().hex[:8]}"
    with bridge(platform) as publisher, bridge(platform, client_id=client_id, clean_session=False) as first:
        assert first.subscribe(topic) == [1]
        with bridge(platform, client_id=client_id, clean_session=False) as second:
            assert second.session_present
            assert first.disconnected.wait(10)  # the broker ended the first connection
            first.client.disconnect()  # and paho does not take the session back
            for n in range(3):
                publisher.publish(topic, f"live-{n}".encode())
            # Delivered live to the new connection (amqtt marked the session disconnected behind its back,
            # so these waited for a reconnection that never came).
            assert payloads(second.take(3)) == ["live-0", "live-1", "live-2"]
            assert not second.disconnected.is_set()


# --- (a) a persistent session keeps QoS 1 messages while it is away ---------------------------------


def test_a_persistent_session_gets_the_qos1_messages_sent_while_it_was_disconnected(platform):
    topic, client_id = f"test/{uuid.uuid4().hex}/queued", f"persistent-{uuid.uuid4().hex[:8]}"
    with bridge(platform, client_id=client_id, clean_session=False) as subscriber:
        assert subscriber.subscribe(topic) == [1]
    with bridge(platform) as publisher:
        for n in range(5):
            publisher.publish(topic, f"m{n}".encode())
    with bridge(platform, client_id=client_id, clean_session=False) as subscriber:
        received = subscriber.take(5)
        assert payloads(received) == [f"m{n}" for n in range(5)]  # in order
        assert not any(message.retain for message in received)  # queued, not retained messages
        publisher_marker = f"after-{uuid.uuid4().hex[:6]}"
        with bridge(platform) as publisher:
            publisher.publish(topic, publisher_marker.encode())
        assert payloads(subscriber.take(1)) == [publisher_marker]  # live again, and nothing twice before it


# --- (b) a message not acknowledged before its subscriber was killed is delivered again ---------------


def test_a_qos1_message_unacknowledged_by_a_killed_subscriber_is_delivered_again(platform):
    topic, client_id = f"test/{uuid.uuid4().hex}/inflight", f"killed-{uuid.uuid4().hex[:8]}"
    code = "from mqtt.testing import unacknowledging_subscriber_main as main; main()"
    password = platform.env["MQTT_BRIDGE_PASSWORD"]
    argv = [sys.executable, "-c", code, platform.mqtt_url, settings.MQTT_BRIDGE_USERNAME, password, client_id, topic]
    subscriber = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert subscriber.stdout.readline().strip() == "subscribed"
        with bridge(platform) as publisher:
            publisher.publish(topic, b"m1")
            assert subscriber.stdout.readline().strip() == "got m1"  # received, never acknowledged
            subscriber.send_signal(signal.SIGKILL)
            subscriber.wait(10)
            publisher.publish(topic, b"m2")  # while it is gone
    finally:
        subscriber.kill()
        subscriber.wait()
    with bridge(platform, client_id=client_id, clean_session=False) as restarted, bridge(platform) as publisher:
        publisher.publish(topic, b"m3")
        received = {message.payload.decode(): message for message in restarted.take(3)}
        assert set(received) == {"m1", "m2", "m3"}  # each once
        assert received["m1"].dup  # sent again, flagged as such (MQTT 3.1.1 §3.3.1.1)
        publisher.publish(topic, b"m4")
        assert payloads(restarted.take(1)) == ["m4"]


# --- (c) a shared subscription gives each message to one member of the group ---------------------------


def test_a_shared_subscription_splits_messages_between_its_members(platform):
    base, group = f"test/{uuid.uuid4().hex}", f"g{uuid.uuid4().hex[:8]}"
    topic, shared = f"{base}/x", f"$share/{group}/{base}/+"
    ids = [f"member-{n}-{uuid.uuid4().hex[:6]}" for n in (1, 2)]
    probes: list[str] = []
    with bridge(platform) as publisher, bridge(platform) as plain:
        assert plain.subscribe(f"{base}/+") == [1]
        for malformed in (f"$share/{group}", "$share//x", f"$share/{group}/"):
            assert plain.subscribe(malformed) == [0x80]
        with bridge(platform, client_id=ids[0], clean_session=False) as first:
            with bridge(platform, client_id=ids[1], clean_session=False) as second:
                assert first.subscribe(shared) == [1] and second.subscribe(shared) == [1]
                both = [f"both-{n}" for n in range(20)]
                for payload in both:
                    publisher.publish(topic, payload.encode())
                # Each message to one member, in turn; a plain subscription still gets every one.
                assert sorted(payloads(first.take(10)) + payloads(second.take(10))) == sorted(both)
                assert payloads(plain.take(20)) == both

            # The second member left (its persistent session stays): every message goes to the connected one. Until
            # the broker has seen it leave a message may still go its way, so probe until one reaches the first.
            def probe_reaches_first() -> bool:
                probes.append(f"probe-{len(probes)}")
                publisher.publish(topic, probes[-1].encode())
                try:
                    return payloads(first.take(1, timeout=2)) == [probes[-1]]
                except AssertionError:
                    return False  # it went to the second member: kept for its return

            wait_until(probe_reaches_first, timeout=30, message="a probe to reach the only connected member")
            alone = [f"alone-{n}" for n in range(6)]
            for payload in alone:
                publisher.publish(topic, payload.encode())
            assert payloads(first.take(6)) == alone

        # No member connected: each message is kept for one of them (both persistent) until it returns.
        away = [f"away-{n}" for n in range(4)]
        for payload in away:
            publisher.publish(topic, payload.encode())
        assert payloads(plain.take(len(probes) + len(alone) + len(away)))[-4:] == away
    expected = sorted(away + probes[:-1])  # and the probes that went to the second member before it was seen gone
    returned: list[str] = []
    with bridge(platform, client_id=ids[0], clean_session=False) as first:
        with bridge(platform, client_id=ids[1], clean_session=False) as second:

            def all_returned() -> bool:
                for member in (first, second):
                    while not member.messages.empty():
                        returned.append(member.messages.get_nowait().payload.decode())
                return len(returned) >= len(expected)

            wait_until(all_returned, timeout=30, message="the messages kept for the absent members")
    assert sorted(returned) == expected


# --- the broker refuses when it cannot ask -----------------------------------------------------------


@pytest.mark.parametrize("fault", ["auth service down", "wrong secret"])
def test_a_broker_that_cannot_get_an_answer_refuses_the_login(api, platform, platform_logs, fault):
    device = register_device(api, "SN-MQTT-NOAUTH")
    env = {**platform.env, "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}"}
    if fault == "wrong secret":
        env["MQTT_AUTH_SECRET"] += "-not-the-platforms"
        base_url = platform.base_url
    else:
        base_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    broker = Platform(env=env, base_url=base_url)
    log_dir = Path(platform_logs) / f"broker-{fault.replace(' ', '-')}"
    log_dir.mkdir(exist_ok=True)
    start_mqtt_broker(broker, log_dir=log_dir)
    try:
        with pytest.raises(MqttRefused), as_device(broker, device):
            pass
        with as_device(platform, device):  # the same login, on a broker that can ask: allowed
            pass
    finally:
        broker.stop()
