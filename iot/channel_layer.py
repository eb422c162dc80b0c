"""The Channels layer: channels_redis, with its blocking receive kept inside the Redis read timeout.

channels_redis receives with `BZPOPMIN <channel> 5` in a loop, and redis-py (8.x) gives every
connection a 5 s read timeout unless told otherwise. With both at 5 s the client gives up just
before Redis answers "nothing yet": measured here, BZPOPMIN with a 5 s block on an idle channel
raised `redis.exceptions.TimeoutError: Timeout reading from ...` after 5.006 s. The error ends the
consumer's receive loop, so every WebSocket of the live feed closed after 5 s without a point.
Raising the read timeout instead would only move the cliff (and slow the detection of a dead Redis
for every other layer command), so the block follows the read timeout: it is derived from the
connections the layer will really use, whatever sets their timeout (settings, URL query, redis-py
default), and cannot drift from it.

A receive that never times out must also end when it is cancelled, and on Python 3.11 it may not:
redis-py sends each command under `asyncio.wait_for`, which returns the result instead of raising
when a cancellation lands just as the send completes (CPython gh-86296, fixed in 3.12). channels_redis
then goes on with the next `BZPOPMIN`. Measured here: of 400 receives cancelled 0-10 ms after they
started, 41 kept running until a read timeout ended them; with the block inside the read timeout
nothing would. Such a loop keeps a Redis connection busy and its WebSocket's task alive; one (left
by a refused connection) held the web server's shutdown for its whole 10 s grace period. The task
still records the request (`Task.cancelling()`), so the layer honours it after each wait, i.e.
within one block.
"""

import asyncio
import inspect
import threading
from collections.abc import Sequence

from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer as BaseRedisChannelLayer

# Block for at most this share of the read timeout. The rest absorbs the round trip and an event
# loop busy with other sockets when Redis answers; idle, a web process with open feeds then sends
# 2 commands (the layer's cleanup script + BZPOPMIN) every REDIS_SOCKET_TIMEOUT / 2 seconds.
BLOCK_SHARE_OF_READ_TIMEOUT = 0.5


def _read_timeout(pool) -> float | None:
    """The read timeout (seconds, None = none) of the connections `pool` makes."""
    if "socket_timeout" in pool.connection_kwargs:
        return pool.connection_kwargs["socket_timeout"]
    # The connection class' own default (redis-py's Connection takes it through **kwargs from its base).
    for cls in pool.connection_class.__mro__:
        if "__init__" in vars(cls):
            parameter = inspect.signature(cls.__init__).parameters.get("socket_timeout")
            if parameter is not None:
                return parameter.default
    return None


class RedisChannelLayer(BaseRedisChannelLayer):
    """channels_redis' layer whose `BZPOPMIN` returns well before its connections' read timeout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Pools connect lazily: building one per host here opens no connection.
        timeouts = [_read_timeout(self.create_pool(index)) for index in range(self.ring_size)]
        finite = [timeout for timeout in timeouts if timeout]
        if finite:
            self.brpop_timeout = min(self.brpop_timeout, BLOCK_SHARE_OF_READ_TIMEOUT * min(finite))

    async def _brpop_with_clean(self, index, channel, timeout):
        """One wait of channels_redis' receive loop, ending it if a cancellation was swallowed.

        A message popped by the wait stays in channels_redis' backup queue and goes back to the
        channel on the next receive, so raising after it loses nothing.
        """
        _raise_if_cancel_requested()
        member = await super()._brpop_with_clean(index, channel, timeout)
        _raise_if_cancel_requested()
        return member


def _raise_if_cancel_requested() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


class _ChannelLayerLoop:
    """A long-lived event loop (one thread per process) for channel-layer calls from sync code.

    `async_to_sync(layer.group_send)` from a thread without a loop builds a new
    event loop, and with it a new Redis connection pool, on every call: measured
    ~5 ms per send here. Keeping one loop keeps channels_redis' pool: ~0.6 ms.
    """

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Lock()  # guards the one-time start only

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        with self._started:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="channel-layer-loop", daemon=True).start()
                self._loop = loop
            return self._loop

    def run(self, coroutine, *, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._get_loop())
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


_layer_loop = _ChannelLayerLoop()

GROUP_SEND_TIMEOUT_SECONDS = 5.0


def channel_group_send(*, group: str, message: dict, timeout: float = GROUP_SEND_TIMEOUT_SECONDS) -> None:
    """Send `message` (with its `type`) to a Channels group from sync code (an event handler).

    Raises what the layer raises (Redis errors, `TimeoutError`), so a handler of the event
    queue sees the event again; does nothing when no layer is configured.
    """
    layer = get_channel_layer()
    if layer is None:
        return
    _layer_loop.run(layer.group_send(group, message), timeout=timeout)


def channel_group_send_many(
    *, sends: Sequence[tuple[str, dict]], timeout: float = GROUP_SEND_TIMEOUT_SECONDS
) -> list[BaseException | None]:
    """`channel_group_send` for many (group, message) pairs at once: one hop to the layer's loop,
    the sends concurrent on it. Returns, per pair, None (sent) or the exception its send raised;
    raises `TimeoutError` if they did not all finish in `timeout` (then none may be taken as sent).

    For a consumer handling a batch of events: one wait for all its pushes, not one each.
    """
    layer = get_channel_layer()
    if layer is None or not sends:
        return [None] * len(sends)

    async def send_all() -> list[BaseException | None]:
        results = await asyncio.gather(
            *(layer.group_send(group, message) for group, message in sends), return_exceptions=True
        )
        return [result if isinstance(result, BaseException) else None for result in results]

    return _layer_loop.run(send_all(), timeout=timeout)
