"""The MQTT topics of a device (docs/MQTT.md), in one place: their names, and which device a topic names.

devices/{id}/telemetry    device -> platform: a point or a batch (the JSON of POST /telemetry/point|batch)
devices/{id}/ota/status   device -> platform: progress and result of an update (POST /firmware/updates/{id}/report)
devices/{id}/status       device -> platform: `{"status": "online"}` at connect, `"offline"` as its last will
devices/{id}/ota          platform -> device: the update waiting for it (GET /firmware/device/update)
devices/{id}/errors       platform -> device: why a message it published was refused
"""

import uuid
from dataclasses import dataclass

PREFIX = "devices"

TELEMETRY = "telemetry"
OTA_STATUS = "ota/status"
STATUS = "status"
OTA = "ota"
ERRORS = "errors"

# What a device may publish, and what it may subscribe to (exact topics, its own id only).
DEVICE_PUBLISHES = (TELEMETRY, OTA_STATUS, STATUS)
DEVICE_SUBSCRIBES = (OTA, ERRORS)


def device_topic(device_id: uuid.UUID | str, kind: str) -> str:
    return f"{PREFIX}/{device_id}/{kind}"


def bridge_filters(*, shared_group: str = "") -> list[str]:
    """The filters the ingest bridge subscribes to: what every device publishes. With a group, as a shared
    subscription (`$share/{group}/...`), so that several bridges split the messages instead of each taking all."""
    filters = [f"{PREFIX}/+/{kind}" for kind in DEVICE_PUBLISHES]
    return [f"$share/{shared_group}/{f}" for f in filters] if shared_group else filters


@dataclass(frozen=True)
class DeviceTopic:
    device_id: uuid.UUID
    kind: str


def topic_parse(topic: str) -> DeviceTopic | None:
    """`devices/{uuid}/{kind}` -> (device id, kind), for a kind in DEVICE_PUBLISHES or DEVICE_SUBSCRIBES;
    None for anything else (another prefix, a malformed id, wildcards, extra levels)."""
    prefix, sep, rest = topic.partition("/")
    if prefix != PREFIX or not sep:
        return None
    raw_id, sep, kind = rest.partition("/")
    if not sep or kind not in DEVICE_PUBLISHES + DEVICE_SUBSCRIBES or len(raw_id) != 36:
        return None
    try:
        device_id = uuid.UUID(raw_id)
    except ValueError:
        return None
    if str(device_id) != raw_id.lower():
        return None
    return DeviceTopic(device_id=device_id, kind=kind)
