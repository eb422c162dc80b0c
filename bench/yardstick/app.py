"""The yardstick: the platform's single-point ingestion written the plain async way (FastAPI + asyncpg).

Not part of the platform. `bench/suite.py` starts it next to the real server (4 uvicorn
workers, same Postgres, same Redis) and divides our `POST /telemetry/point` req/s by its
own, in the same minutes of the same machine. It does the same work per point, round trip
for round trip:

1. the operator token from a Redis cache: one `GET` (a miss reads `authtoken_token` joined to
   `auth_user` and fills the cache);
2. admission: one `GET` of the platform's event-queue depth (refused past the thresholds);
3. the device's sliding window and the global second, checked and taken in one Lua script;
4. one transaction: the `INSERT ... SELECT` joined to the device row (not decommissioned; `ON CONFLICT
   DO NOTHING`: a point is identified by device, metric and timestamp, as in the platform), then
   the conditional `last_seen` UPDATE (at most once a second per device); when that updated the
   row, a tombstone for the device's cache entry in the transaction and again after commit;
5. after commit, the event: depth checked, `XADD` and the depth raised in one script, into the
   platform's own stream in the platform's format, so the same consumers drain both servers'
   events (the downstream work is the same too).

What it leaves out, knowingly: Prometheus counters, the epoch (`run_id`) guard of the
platform's cache entries (a plain `GET`/`SET` here), and idempotency keys (not sent).
Validation is pydantic's, as a FastAPI service would do it.

Configured by environment (set by the suite): `YARDSTICK_PG_HOST/PORT/USER/PASSWORD/DB`,
`YARDSTICK_PG_POOL_MAX`, `REDIS_URL`, `REDIS_KEY_PREFIX` (its own keys go under it),
`YARDSTICK_STREAM_KEY` and `YARDSTICK_DEPTH_KEY` (the platform's event queue),
`YARDSTICK_RATE_LIMIT_PER_DEVICE`, `YARDSTICK_RATE_LIMIT_WINDOW_SECONDS`,
`YARDSTICK_RATE_LIMIT_GLOBAL`, `YARDSTICK_QUEUE_THRESHOLD`, `YARDSTICK_QUEUE_MAX`.

    uvicorn app:app --app-dir bench/yardstick --workers 4 --loop uvloop --http httptools --no-access-log
"""

import hashlib
import math
import os
import re
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Header, HTTPException, Response
from pydantic import BaseModel, field_validator

PREFIX = os.environ.get("REDIS_KEY_PREFIX", "iot")
OWN = f"{PREFIX}:yardstick"
# The platform's event queue (iot/event_queue.py names the keys; the suite asks it and passes them on).
STREAM_KEY = os.environ.get("YARDSTICK_STREAM_KEY", f"{PREFIX}:events:stream")
DEPTH_KEY = os.environ.get("YARDSTICK_DEPTH_KEY", f"{PREFIX}:events:depth")
LIMIT = int(os.environ.get("YARDSTICK_RATE_LIMIT_PER_DEVICE", "100"))
WINDOW_SECONDS = int(os.environ.get("YARDSTICK_RATE_LIMIT_WINDOW_SECONDS", "60"))
GLOBAL_LIMIT = int(os.environ.get("YARDSTICK_RATE_LIMIT_GLOBAL", "1000"))
QUEUE_THRESHOLD = int(os.environ.get("YARDSTICK_QUEUE_THRESHOLD", "8000"))
QUEUE_MAX = int(os.environ.get("YARDSTICK_QUEUE_MAX", "10000"))
TOKEN_TTL_SECONDS = 300
TOMBSTONE_TTL_MS = 60_000
MAX_FUTURE = timedelta(seconds=300)
RETENTION = timedelta(days=30)
METRIC = re.compile(r"[A-Za-z0-9_.:/\-]{1,100}")

# Sliding window: a sorted set of "<points>:<request id>" scored by Redis milliseconds, and
# the points it holds in a counter beside it; the global limit is a hash {second, count}.
# Expired entries are subtracted as they are removed; both limits are checked before either
# is taken. KEYS: log, total, global. ARGV: points, limit, window ms, global limit, request id.
# Returns {allowed, remaining}.
WINDOW_SCRIPT = """
local now_parts = redis.call('TIME')
local sec = tonumber(now_parts[1])
local now = sec * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local n = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local span = tonumber(ARGV[3])
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - span)
if #gone > 0 then
  for _, member in ipairs(gone) do held = held - tonumber(string.sub(member, 1, string.find(member, ':') - 1)) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
end
if held + n > cap then return {0, cap - held} end
local g = redis.call('HMGET', KEYS[3], 's', 'c')
local in_second = 0
if tonumber(g[1]) == sec then in_second = tonumber(g[2]) end
if in_second + n > tonumber(ARGV[4]) then return {0, cap - held} end
redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. ARGV[5])
redis.call('SET', KEYS[2], held + n, 'PX', span + 1000)
redis.call('PEXPIRE', KEYS[1], span + 1000)
redis.call('HSET', KEYS[3], 's', sec, 'c', in_second + n)
redis.call('EXPIRE', KEYS[3], 2)
return {1, cap - held - n}
"""

# KEYS: stream, depth. ARGV: max depth, weight, type, payload. The platform's event entry format.
PUBLISH_SCRIPT = """
local depth = tonumber(redis.call('GET', KEYS[2]) or '0')
if depth + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', 't', ARGV[3], 'w', ARGV[2], 'p', ARGV[4])
redis.call('INCRBY', KEYS[2], ARGV[2])
return 1
"""

STORE_SQL = """
WITH d AS (SELECT id, group_id FROM devices_device WHERE id = $1 AND status <> 'decommissioned'),
ins AS (
    INSERT INTO telemetry_point (device_id, metric, ts, value)
    SELECT d.id, $2, $3, $4 FROM d
    ON CONFLICT (device_id, metric, ts) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) AS inserted, EXISTS (SELECT FROM d) AS found, (SELECT group_id FROM d) AS group_id,
       now() AS received_at
"""

MARK_SEEN_SQL = """
UPDATE devices_device
SET last_seen = now(),
    status = CASE WHEN status IN ('registered', 'inactive') THEN 'active' ELSE status END,
    version = version + 1
WHERE id = $1
  AND (last_seen IS NULL OR last_seen < now() - interval '1000 milliseconds' OR status IN ('registered', 'inactive'))
RETURNING version
"""

TOKEN_SQL = """
SELECT u.id, u.is_active FROM authtoken_token AS t JOIN auth_user AS u ON u.id = t.user_id WHERE t.key = $1
"""


class Status(BaseModel):
    status: str


class Point(BaseModel):
    device_id: uuid.UUID
    timestamp: datetime
    metric: str
    value: float

    @field_validator("metric")
    @classmethod
    def metric_name(cls, value: str) -> str:
        if not METRIC.fullmatch(value):
            raise ValueError("1 to 100 characters from letters, digits and _ . : / -")
        return value

    @field_validator("value")
    @classmethod
    def finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("timestamp")
    @classmethod
    def utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


state: dict = {}


@asynccontextmanager
async def lifespan(_app: FastAPI):
    state["pg"] = await asyncpg.create_pool(
        host=os.environ.get("YARDSTICK_PG_HOST", "127.0.0.1"),
        port=int(os.environ.get("YARDSTICK_PG_PORT", "5432")),
        user=os.environ.get("YARDSTICK_PG_USER", "postgres"),
        password=os.environ.get("YARDSTICK_PG_PASSWORD") or None,
        database=os.environ["YARDSTICK_PG_DB"],
        min_size=2,
        max_size=int(os.environ.get("YARDSTICK_PG_POOL_MAX", "16")),
    )
    client = aioredis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), max_connections=64)
    state["redis"] = client
    state["window"] = client.register_script(WINDOW_SCRIPT)
    state["publish"] = client.register_script(PUBLISH_SCRIPT)
    yield
    await state["pg"].close()
    await client.aclose()


# Responses are serialized by pydantic from the return types (FastAPI's fast path; ORJSONResponse is deprecated).
app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None)


async def operator(authorization: str | None) -> None:
    if not authorization or not authorization.startswith("Token "):
        raise HTTPException(401, "Authentication credentials were not provided.")
    key = authorization[6:]
    cache_key = f"{OWN}:token:{hashlib.sha256(key.encode()).hexdigest()}"
    cached = await state["redis"].get(cache_key)
    if cached is None:
        row = await state["pg"].fetchrow(TOKEN_SQL, key)
        if row is None:
            raise HTTPException(401, "Invalid token.")
        cached = orjson.dumps([row["id"], row["is_active"]])
        await state["redis"].set(cache_key, cached, ex=TOKEN_TTL_SECONDS)
    if not orjson.loads(cached)[1]:
        raise HTTPException(401, "User inactive or deleted.")


@app.get("/health/live")
async def live() -> Status:
    return Status(status="ok")


@app.post("/telemetry/point", status_code=202)
async def point(body: Point, response: Response, authorization: str | None = Header(default=None)) -> Status:
    await operator(authorization)
    now = datetime.now(UTC)
    if body.timestamp > now + MAX_FUTURE or body.timestamp < now - RETENTION:
        raise HTTPException(422, "timestamp out of window")
    client = state["redis"]
    depth = int(await client.get(DEPTH_KEY) or 0)
    if depth >= QUEUE_THRESHOLD:
        raise HTTPException(429, "busy", headers={"Retry-After": "1"})
    device = str(body.device_id)
    allowed, remaining = await state["window"](
        keys=[f"{OWN}:rl:{device}:log", f"{OWN}:rl:{device}:total", f"{OWN}:rl:global"],
        args=[1, LIMIT, WINDOW_SECONDS * 1000, GLOBAL_LIMIT, uuid.uuid4().hex],
    )
    if not allowed:
        raise HTTPException(429, "rate limited", headers={"Retry-After": "1"})
    tombstone = f"{OWN}:device:{device}"
    async with state["pg"].acquire() as conn, conn.transaction():
        stored = await conn.fetchrow(STORE_SQL, body.device_id, body.metric, body.timestamp, body.value)
        if not stored["found"]:
            raise HTTPException(422, "unknown or decommissioned device")
        version = await conn.fetchval(MARK_SEEN_SQL, body.device_id)
        if version is not None:
            await client.set(tombstone, version, px=TOMBSTONE_TTL_MS)
    if version is not None:
        await client.set(tombstone, version, px=TOMBSTONE_TTL_MS)
    event = {
        "event_id": uuid.uuid4().hex,
        "device_id": device,
        "group_id": stored["group_id"],
        "received_at": stored["received_at"],
        "metrics": [body.metric],
        "timestamps": [body.timestamp],
        "values": [body.value],
    }
    if stored["inserted"]:  # a point stored already (a retry) has had its event
        args = [QUEUE_MAX, 1, "telemetry.points", orjson.dumps(event)]
        await state["publish"](keys=[STREAM_KEY, DEPTH_KEY], args=args)
    response.headers["X-RateLimit-Limit"] = str(LIMIT)
    response.headers["X-RateLimit-Remaining"] = str(remaining)
    return Status(status="accepted")
