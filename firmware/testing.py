"""The firmware app's part of the test kit: releases with real artifacts, updates, rollouts' advance kept
in the test's process, and a device that speaks the device-facing API over HTTP (the shared part is
`iot/testing/`, which imports no domain app)."""

import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import httpx
from django.core.files.base import ContentFile

from firmware.models import FirmwareRelease
from firmware.services import firmware_artifact_attach, firmware_release_register


def platform_ready(client: httpx.Client, *, timeout: float = 120.0) -> None:
    """Wait until the live platform's readiness passes (a worker is up: its first tasks are not timed)."""
    deadline = time.monotonic() + timeout
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, f"the platform was not ready within {timeout}s"
        time.sleep(0.2)


def artifact_bytes(size: int = 64 * 1024, *, seed: str | None = None) -> bytes:
    """Deterministic pseudo-random content of `size` bytes (a stand-in firmware image)."""
    seed_bytes = (seed or uuid.uuid4().hex).encode()
    blocks = -(-size // 32)  # SHA-256 digests of 32 bytes each
    return b"".join(hashlib.sha256(seed_bytes + n.to_bytes(8, "big")).digest() for n in range(blocks))[:size]


def sha256_checksum(content: bytes, *, style: str = "sha256-") -> str:
    """The checksum a publisher would register for `content`: `sha256-<hex>`, `sha256:<hex>` or plain hex."""
    digest = hashlib.sha256(content).hexdigest()
    return digest if style == "" else f"{style}{digest}"


def new_version(prefix: str = "2.0") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def release_create(
    *, version: str | None = None, content: bytes | None = None, checksum: str | None = None
) -> FirmwareRelease:
    """A release registered through the service, with `content` as its artifact (None: no artifact).

    The checksum defaults to the content's own (`sha256-<hex>`), so updates to it verify.
    """
    version = version or new_version()
    release = firmware_release_register(
        version=version,
        checksum=checksum or (sha256_checksum(content) if content is not None else f"sha256-{uuid.uuid4().hex[:8]}"),
        size_bytes=len(content) if content is not None else None,
    )
    if content is not None:
        release = firmware_artifact_attach(version=version, file=ContentFile(content, name="image.bin"))
    return release


def release_publish(client: httpx.Client, *, content: bytes, version: str | None = None) -> dict:
    """Register a release over HTTP and upload `content` as its artifact; returns the release JSON."""
    version = version or new_version()
    response = client.post(
        "/firmware/register",
        json={"version": version, "checksum": sha256_checksum(content), "size_bytes": len(content)},
    )
    assert response.status_code == 201, response.text
    response = client.put(f"/firmware/versions/{version}/artifact", files={"file": ("image.bin", content)})
    assert response.status_code == 201, response.text
    assert response.json()["artifact_sha256"] == hashlib.sha256(content).hexdigest()
    return response.json()


@dataclass
class DeviceFirmwareClient:
    """A device's side of the firmware API over HTTP, with its own credential."""

    client: httpx.Client
    device_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Device {self.device_token}"}

    def pending(self) -> httpx.Response:
        return self.client.get("/firmware/device/update", headers=self.headers)

    def download(self, artifact_url: str) -> httpx.Response:
        return self.client.get(artifact_url, headers=self.headers)

    def report(self, update_id: str, status: str, **fields) -> httpx.Response:
        return self.client.post(
            f"/firmware/updates/{update_id}/report", json={"status": status, **fields}, headers=self.headers
        )


@contextmanager
def rollout_advance_capture() -> Iterator[list[uuid.UUID]]:
    """Instead of queuing `firmware.tasks.rollout_advance`, record the rollout id of each advance requested
    (after the debounce in Redis), in order; the test calls `firmware.rollouts.firmware_rollout_advance`."""
    requested: list[uuid.UUID] = []
    with mock.patch("firmware.rollouts._advance_task_queue", requested.append):
        yield requested
