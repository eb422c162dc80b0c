"""The seam between a simulated device and the wire: what a device says, not how it travels.

A device (`iot.simulator.device.SimulatedDevice`) only ever calls the four methods of
`Transport`; HTTP is `iot.simulator.client.HttpTransport`, MQTT is
`iot.simulator.mqtt_transport.MqttTransport`, which maps the same calls onto
`devices/{id}/telemetry`, `devices/{id}/ota` and `devices/{id}/ota/status` (docs: ../shared/CONTRACT.md).
Every answer is a `Reply` shaped like an HTTP answer (status, JSON body, `Retry-After`), because
that is the vocabulary the platform's refusals use on every transport: 202 stored, 429/503 wait
and retry, other 4xx refused for good (over MQTT, 202 means the broker has it: see its module).
"""

import base64
import binascii
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


class TransportError(Exception):
    """The request may or may not have reached the server (connection refused, reset, timeout)."""


@dataclass(frozen=True)
class DeviceIdentity:
    """What a device knows about itself after registration."""

    id: str
    serial_number: str
    token: str


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def refused_for_now(self) -> bool:
        """429/503: nothing was done, the same request may pass later."""
        return self.status in (429, 503)


@dataclass(frozen=True)
class Download:
    """An artifact fetched and hashed on the fly (the bytes themselves are not kept)."""

    status: int
    sha256: str | None = None
    size: int = 0
    retry_after: float | None = None


class Transport(ABC):
    """How a device talks to the platform. Implementations are shared by every device of a fleet."""

    @abstractmethod
    async def send_points(
        self, device: DeviceIdentity, points: list[dict], *, idempotency_key: str | None = None
    ) -> Reply:
        """Send points (`{timestamp, metric, value}` each) of `device`; 202 means stored."""

    @abstractmethod
    async def poll_update(self, device: DeviceIdentity) -> Reply:
        """The device's pending firmware update: 200 + offer, or 204 when there is none."""

    @abstractmethod
    async def report(self, device: DeviceIdentity, update_id: str, report: dict) -> Reply:
        """A progress or result report (`{status, progress?, version?, reason?}`) for one update."""

    @abstractmethod
    async def download(self, device: DeviceIdentity, url: str) -> Download:
        """Fetch an artifact and hash it (SHA-256)."""

    def device_counters(self, device_id: str) -> dict[str, int]:
        """Counters the transport keeps for a device beside the device's own (`DeviceStats`): over MQTT,
        the messages the broker took and the platform then refused (`refused_async`). None over HTTP."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def checksum_expected_sha256(checksum: str) -> str | None:
    """The SHA-256 hex digest a release's checksum names, or None if it names none.

    Accepted forms (the platform stores checksums as given): `sha256-<hex>`, `sha256:<hex>`,
    plain hex, and `sha256-<base64>` (the Subresource Integrity spelling).
    """
    text = checksum.strip()
    lowered = text.lower()
    for prefix in ("sha256-", "sha256:"):
        if lowered.startswith(prefix):
            text = text[len(prefix) :]
            break
    else:
        return text.lower() if _HEX64.fullmatch(text) else None
    if _HEX64.fullmatch(text):
        return text.lower()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None
