"""Event handlers of the mqtt app (autodiscovered by the event-queue consumers).

"firmware.offer_changed" (after the commit of the saga step that dispatched an update to a device,
or withdrew it: `firmware.saga`) pushes the device what it is offered now on `devices/{id}/ota`,
QoS 1: the JSON of `GET /firmware/device/update`, or `null` when nothing is (the update was
cancelled or superseded). The offer is read when the event is handled, so a late or repeated push
carries the current state, not the one of the moment it was queued. A broker that does not
acknowledge raises, and the event queue retries the push; a device that was not connected gets it
from its persistent session, or by polling over HTTP (which keeps working). At least once: a
repeated push carries the same `update_id`, and a device's report on an update is idempotent.
"""

import orjson
from django.conf import settings
from django.urls import reverse

from firmware.api.serializers import DeviceUpdateSerializer
from firmware.saga import OFFER_CHANGED_EVENT
from firmware.selectors import device_pending_update
from iot.event_queue import event_handler
from iot.mqtt import mqtt_enabled, mqtt_publish
from mqtt import topics


def artifact_url(version: str) -> str:
    """The artifact's URL for a device that is not answering an HTTP request: on `PUBLIC_BASE_URL`."""
    return settings.PUBLIC_BASE_URL.rstrip("/") + reverse("firmware-artifact", kwargs={"version": version})


@event_handler(OFFER_CHANGED_EVENT)
def offer_changed(payload: dict) -> None:
    """Push the device its current offer (or `null`). A malformed payload raises (and ends as a dead letter)."""
    if not mqtt_enabled():
        return
    try:
        device_id = str(payload["device_id"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {OFFER_CHANGED_EVENT} payload: {exc!r}") from exc
    update = device_pending_update(device_id=device_id)
    offer = (
        None
        if update is None
        else DeviceUpdateSerializer(update, context={"artifact_url": artifact_url(update.to_version)}).data
    )
    mqtt_publish(topic=topics.device_topic(device_id, topics.OTA), payload=orjson.dumps(offer), qos=1)
