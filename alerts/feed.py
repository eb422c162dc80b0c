"""Names shared by the feed's publisher (`alerts.events`) and its consumer (`alerts.consumers`)."""

import re

from django.conf import settings

FEED_MESSAGE_TYPE = "alerts.event"  # dispatched to AlertsFeedConsumer.alerts_event


def alerts_feed_group() -> str:
    """The Channels group of the operators' alert feed; per key prefix, so deployments sharing a
    Redis (or parallel test platforms) never see each other's alerts (names: ASCII, < 100 chars)."""
    return "alerts.feed." + re.sub(r"[^A-Za-z0-9_.-]", "_", settings.REDIS_KEY_PREFIX)[:80]
