"""The Channels layer (`iot.channel_layer`) against the real Redis: idle receives and cancellation.

Layers are built here with a 0.4 s read timeout so an idle period longer than it is quick.
"""

import asyncio
import uuid

import pytest
from django.conf import settings
from redis.asyncio.connection import Connection

from iot.channel_layer import RedisChannelLayer

READ_TIMEOUT = 0.4
IDLE_SECONDS = 1.0  # longer than READ_TIMEOUT, and than two of the layer's blocks


def _layer(host) -> RedisChannelLayer:
    return RedisChannelLayer(hosts=[host], prefix=f"{settings.REDIS_KEY_PREFIX}:test-layer-{uuid.uuid4().hex}:")


def test_the_configured_layer_blocks_for_less_than_its_read_timeout():
    layer = RedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])
    assert 0 < layer.brpop_timeout < settings.REDIS_SOCKET_TIMEOUT


def test_without_a_configured_timeout_the_block_follows_redis_py_default():
    layer = _layer(settings.REDIS_URL)
    default = Connection(host="127.0.0.1").socket_timeout
    assert default and 0 < layer.brpop_timeout < default


@pytest.mark.parametrize(
    "host",
    [
        {"address": settings.REDIS_URL, "socket_timeout": READ_TIMEOUT},
        # The URL's query wins over keyword arguments in redis-py; the layer follows the connection's value.
        f"{settings.REDIS_URL}?socket_timeout={READ_TIMEOUT}",
    ],
    ids=["hosts-dict", "url-query"],
)
def test_an_idle_receive_outlives_the_read_timeout_then_gets_its_message(host):
    layer = _layer(host)

    async def scenario():
        channel = await layer.new_channel()
        receive = asyncio.ensure_future(layer.receive(channel))
        try:
            done, _ = await asyncio.wait([receive], timeout=IDLE_SECONDS)
            assert not done, f"the idle receive ended: {receive.exception()!r}"
            await layer.send(channel, {"type": "test.message", "n": 1})
            message = await asyncio.wait_for(receive, timeout=5)
            assert message == {"type": "test.message", "n": 1}
        finally:
            receive.cancel()
            await layer.flush()

    asyncio.run(scenario())


def test_a_cancelled_receive_ends_cancelled_whenever_the_cancel_lands():
    """Cancels 0-10 ms after the receive starts, so some land as redis-py finishes sending a command.

    Without the layer's guard about 1 in 10 of these kept receiving (Python 3.11's `wait_for`
    swallowed the cancellation) until a read timeout or forever.
    """
    layer = _layer({"address": settings.REDIS_URL, "socket_timeout": READ_TIMEOUT})
    deadline = layer.brpop_timeout + 1.0

    async def scenario() -> dict[str, int]:
        outcomes: dict[str, int] = {}
        try:
            for attempt in range(200):
                receive = asyncio.ensure_future(layer.receive(await layer.new_channel()))
                await asyncio.sleep((attempt % 21) * 0.0005)  # where the cancel lands, not a wait for a result
                receive.cancel()
                done, _ = await asyncio.wait([receive], timeout=deadline)
                if not done:
                    outcome = "still running"
                    receive.cancel()
                else:
                    outcome = "cancelled" if receive.cancelled() else repr(receive.exception())
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        finally:
            await layer.flush()
        return outcomes

    assert asyncio.run(scenario()) == {"cancelled": 200}
