"""HTTP for the simulator: the device transport (`HttpTransport`) and the operator's registration calls.

One `httpx.AsyncClient` with a bounded pool serves a whole fleet: 500 devices share
`max_connections` keep-alive connections (a device waits for a free one, up to
`pool_timeout`), so the server sees a bounded number of sockets whatever the fleet's size.
"""

import asyncio
import email.utils
import hashlib
import importlib.util
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from iot.simulator.transport import DeviceIdentity, Download, Reply, Transport, TransportError

JSON_HEADERS = {"Content-Type": "application/json"}

# httpcore runs `import sniffio` on every request, and a missing module is searched for on disk
# each time (anyio 4 no longer installs sniffio): a fifth of the simulator's CPU in a 200-device
# profile. Recording it as absent makes that import fail at once, as it would anyway.
if importlib.util.find_spec("sniffio") is None:
    sys.modules.setdefault("sniffio", None)


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date (None if absent or unreadable)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _body(response: httpx.Response):
    if not response.content:
        return None
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:500]


def _reply(response: httpx.Response) -> Reply:
    return Reply(
        status=response.status_code,
        body=_body(response),
        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
    )


def async_client(
    base_url: str, *, max_connections: int, timeout: float, pool_timeout: float, headers=None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers or {},
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        timeout=httpx.Timeout(timeout, pool=pool_timeout),
    )


class HttpTransport(Transport):
    """The platform's device API over HTTP (`Authorization: Device <token>`)."""

    def __init__(self, base_url: str, *, max_connections: int = 64, timeout: float = 15.0, pool_timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self._origin = urlsplit(self.base_url)[:2]
        self.client = async_client(
            self.base_url, max_connections=max_connections, timeout=timeout, pool_timeout=pool_timeout
        )

    @staticmethod
    def _auth(device: DeviceIdentity) -> dict[str, str]:
        return {"Authorization": f"Device {device.token}"}

    async def _send(self, method: str, url: str, **kwargs) -> Reply:
        try:
            return _reply(await self.client.request(method, url, **kwargs))
        except httpx.HTTPError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def send_points(self, device, points, *, idempotency_key=None) -> Reply:
        headers = {**self._auth(device), **JSON_HEADERS}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if len(points) == 1:
            url, body = "/telemetry/point", {"device_id": device.id, **points[0]}
        else:
            url, body = "/telemetry/batch", {"device_id": device.id, "points": points}
        return await self._send("POST", url, content=orjson.dumps(body), headers=headers)

    async def poll_update(self, device) -> Reply:
        return await self._send("GET", "/firmware/device/update", headers=self._auth(device))

    async def report(self, device, update_id, report) -> Reply:
        headers = {**self._auth(device), **JSON_HEADERS}
        return await self._send(
            "POST", f"/firmware/updates/{update_id}/report", content=orjson.dumps(report), headers=headers
        )

    async def download(self, device, url) -> Download:
        absolute = urljoin(self.base_url + "/", url)
        # The device credential goes only to the platform itself, never to another host.
        headers = self._auth(device) if urlsplit(absolute)[:2] == self._origin else {}
        digest = hashlib.sha256()
        size = 0
        try:
            async with self.client.stream("GET", absolute, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    return Download(
                        status=response.status_code,
                        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                    )
                async for chunk in response.aiter_bytes():
                    digest.update(chunk)
                    size += len(chunk)
        except httpx.HTTPError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return Download(status=200, sha256=digest.hexdigest(), size=size)

    async def aclose(self) -> None:
        await self.client.aclose()


class RegistrationError(Exception):
    """The platform refused a registration for good (bad operator token, invalid body)."""


@dataclass(frozen=True)
class Registration:
    """The platform's answer to `POST /devices`: `token` is None when the serial was already known (200)."""

    serial_number: str
    device_id: str
    created: bool
    token: str | None
    firmware_version: str


async def device_register(
    client: httpx.AsyncClient, body: dict, *, idempotency_key: str | None = None, deadline: float
) -> Registration:
    """`POST /devices` as an operator, retried until `deadline` (monotonic) on 429/503/5xx/network errors.

    With an `Idempotency-Key`, a retry of a registration that was stored but whose answer was lost
    replays the `201` and its token, instead of a `200` without one.
    """
    headers = {**JSON_HEADERS, **({"Idempotency-Key": idempotency_key} if idempotency_key else {})}
    delay = 0.2
    while True:
        try:
            response = await client.post("/devices", content=orjson.dumps(body), headers=headers)
        except httpx.HTTPError as exc:
            problem, wait = f"{type(exc).__name__}: {exc}", delay
        else:
            if response.status_code in (200, 201):
                data = response.json()
                return Registration(
                    serial_number=body["serial_number"],
                    device_id=str(data["id"]),
                    # A replayed 201 (same Idempotency-Key) is a device an earlier run created.
                    created=response.status_code == 201 and response.headers.get("Idempotent-Replayed") != "true",
                    token=data.get("device_token"),
                    firmware_version=data.get("firmware_version") or body["firmware_version"],
                )
            if response.status_code not in (409, 429, 503) and response.status_code < 500:
                raise RegistrationError(
                    f"POST /devices {body['serial_number']}: HTTP {response.status_code} {response.text[:300]}"
                )
            problem = f"HTTP {response.status_code}"
            wait = retry_after_seconds(response.headers.get("Retry-After")) or delay
        if time.monotonic() + wait > deadline:
            raise RegistrationError(f"POST /devices {body['serial_number']}: gave up ({problem})")
        await asyncio.sleep(wait)
        delay = min(delay * 2, 5.0)
