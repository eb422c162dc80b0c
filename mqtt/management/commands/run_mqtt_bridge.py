"""`manage.py run_mqtt_bridge`: one MQTT ingest bridge (`mqtt.bridge`) in this process.

`scripts/platform.py worker` starts `MQTT_BRIDGE_COUNT` of these (one without `MQTT_SHARED_GROUP`)
when `MQTT_URL` is set, each with its index, so each keeps its own persistent session across restarts.
SIGTERM/SIGINT stop it after the message being handled.
"""

import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from iot.mqtt import MqttUnavailable, mqtt_enabled
from mqtt.bridge import MqttBridge


class Command(BaseCommand):
    help = "Ingest what devices publish over MQTT (one bridge; run several with MQTT_SHARED_GROUP set)."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--index", type=int, default=0, help="This bridge's number: its client id is MQTT_BRIDGE_CLIENT_ID-<index>."
        )

    def handle(self, *args, **options) -> None:
        if not mqtt_enabled():
            raise CommandError("MQTT_URL is empty: there is no broker to bridge.")
        client_id = f"{settings.MQTT_BRIDGE_CLIENT_ID}-{options['index']}"
        bridge = MqttBridge(
            client_id=client_id, shared_group=settings.MQTT_SHARED_GROUP, lanes=settings.MQTT_BRIDGE_LANES
        )
        signal.signal(signal.SIGTERM, lambda signum, frame: bridge.stop())
        signal.signal(signal.SIGINT, lambda signum, frame: bridge.stop())
        try:
            bridge.start()
        except MqttUnavailable as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"MQTT bridge {client_id} -> {settings.MQTT_URL}: {', '.join(bridge.filters)}")
        self.stdout.flush()
        bridge.run()
        self.stdout.write(f"MQTT bridge {client_id} stopped after {bridge.handled} message(s)")
