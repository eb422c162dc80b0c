"""`make run` (scripts/platform.py all) starts the embedded MQTT broker when MQTT_URL is unset: on MQTT_PORT, or
a free port when that one is taken (the development machines' Mosquitto holds 1883), with its URL handed to
the other children. Checked on the function that decides it, and by running the command it returns against
the live platform's web server (the runner itself would also migrate and create an admin account)."""

import importlib.util
import os
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from iot.testing.live import register_device
from iot.testing.processes import REPO_ROOT, wait_until
from mqtt.testing import MqttRefused, mqtt_session

pytestmark = pytest.mark.live


@pytest.fixture
def runner(monkeypatch):
    """scripts/platform.py as a module (its `from supervisor import ...` served without putting scripts/ on
    sys.path, where its name would shadow the standard library's `platform`); the environment restored after."""
    loaded = {}
    for name, filename in (("supervisor", "supervisor.py"), ("platform_runner", "platform.py")):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / filename)
        loaded[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, loaded[name])
        spec.loader.exec_module(loaded[name])
    saved = dict(os.environ)
    yield loaded["platform_runner"]
    os.environ.clear()
    os.environ.update(saved)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_the_broker_moves_to_a_free_port_when_mqtt_port_is_taken_and_lets_devices_in(runner, platform, api):
    web_port = str(urlsplit(platform.base_url).port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        wanted = taken.getsockname()[1]
        for name in ("MQTT_URL", "MQTT_BRIDGE_PASSWORD"):
            os.environ.pop(name, None)
        os.environ.update(
            {"MQTT_PORT": str(wanted), "HOST": "127.0.0.1", "MQTT_AUTH_SECRET": platform.env["MQTT_AUTH_SECRET"]}
        )
        children = runner.embedded_mqtt_broker(web_port)
    url = urlsplit(os.environ["MQTT_URL"])
    assert url.scheme == "mqtt" and url.hostname == "127.0.0.1" and url.port != wanted
    assert os.environ["MQTT_AUTH_SECRET"] == platform.env["MQTT_AUTH_SECRET"]  # kept when set
    assert len(os.environ["MQTT_BRIDGE_PASSWORD"]) >= 32  # made up when unset
    (argv,) = children.values()
    assert f"http://127.0.0.1:{web_port}/mqtt" in argv and str(url.port) in argv

    broker = subprocess.Popen(argv, cwd=REPO_ROOT, env={**platform.env, **os.environ})
    try:
        wait_until(lambda: broker.poll() is not None or accepts_connections(url.port), timeout=60, message="broker")
        assert broker.poll() is None
        device = register_device(api, "SN-MQTT-MAKE-RUN")
        with mqtt_session(os.environ["MQTT_URL"], username=device["id"], password=device["device_token"]):
            pass
        with pytest.raises(MqttRefused), mqtt_session(os.environ["MQTT_URL"], username=device["id"], password="x"):
            pass
    finally:
        broker.terminate()
        assert broker.wait(30) == 0  # SIGTERM: a clean stop


def test_no_broker_is_started_when_mqtt_url_names_one(runner):
    os.environ["MQTT_URL"] = "mqtt://broker.example:1883"
    assert runner.embedded_mqtt_broker("8000") == {}
    assert os.environ["MQTT_URL"] == "mqtt://broker.example:1883"
