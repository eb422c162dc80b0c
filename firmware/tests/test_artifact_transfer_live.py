"""Large artifacts over real HTTP (`iot.asgi_bridge`): uploads past the 4 MB request limit, streamed downloads.

A platform of its own (web x2, no worker): artifacts go to a temporary MEDIA_ROOT, each web
process has ONE request thread (a download that kept its thread would block the next request
to that process), and FIRMWARE_ARTIFACT_MAX_BYTES is 64 MiB, so the upload route's limit
(MAX_UPLOAD_BODY_BYTES, unset: it follows the artifact limit + 64 KiB) is reachable. `-s`
prints the download's speed and how much the serving process's peak RSS grew.
"""

import hashlib
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from firmware.testing import artifact_bytes, new_version, release_publish, sha256_checksum
from iot.testing.live import dedicated_platform
from iot.testing.processes import http_client

pytestmark = pytest.mark.live

MiB = 1024 * 1024
ARTIFACT_LIMIT = 64 * MiB


@pytest.fixture(scope="module")
def transfers(django_db_blocker, platform_logs, tmp_path_factory, operator_token):
    env = {
        "MEDIA_ROOT": str(tmp_path_factory.mktemp("transfer-media")),
        "WEB_THREADS": "1",
        "FIRMWARE_ARTIFACT_MAX_BYTES": str(ARTIFACT_LIMIT),
    }
    with dedicated_platform(django_db_blocker, platform_logs, name="transfers", env=env, worker=False) as running:
        with http_client(running, operator_token, timeout=120) as client:
            yield running, client


@pytest.fixture(scope="module")
def released_50_mb(transfers) -> tuple[str, str]:
    """A 50 MiB artifact uploaded over HTTP: (version, its SHA-256)."""
    _, client = transfers
    content = artifact_bytes(50 * MiB)
    release = release_publish(client, content=content)
    return release["version"], release["artifact_sha256"]


def _register(client: httpx.Client) -> str:
    version = new_version()
    response = client.post("/firmware/register", json={"version": version, "checksum": sha256_checksum(b"")})
    assert response.status_code == 201, response.text
    return version


def test_a_20_mb_artifact_uploads_while_other_routes_still_refuse_past_4_mb(transfers):
    _, client = transfers
    content = artifact_bytes(20 * MiB)
    release = release_publish(client, content=content)  # asserts 201 and the SHA-256
    assert release["artifact_size"] == len(content) and release["has_artifact"]

    too_big = client.post("/devices", json={"serial_number": "x" * (4 * MiB), "device_type": "sensor"})
    assert too_big.status_code == 413 and too_big.json() == {"detail": "Request body too large."}

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b" " * MiB

    too_big = client.post("/telemetry/batch", content=chunked(), headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413 and too_big.json() == {"detail": "Request body too large."}


def test_the_upload_route_refuses_past_its_own_limit(transfers):
    """Past MAX_UPLOAD_BODY_BYTES the bridge refuses the request; a file past FIRMWARE_ARTIFACT_MAX_BYTES
    in a request under it is refused by the upload handler. Nothing is attached either way."""
    _, client = transfers
    version = _register(client)
    url = f"/firmware/versions/{version}/artifact"
    over_request = client.put(url, files={"file": ("image.bin", b"\0" * (ARTIFACT_LIMIT + 64 * 1024))})
    assert over_request.status_code == 413 and over_request.json() == {"detail": "Request body too large."}
    over_artifact = client.put(url, files={"file": ("image.bin", b"\0" * (ARTIFACT_LIMIT + 1))})
    assert over_artifact.status_code == 413 and over_artifact.json()["code"] == "artifact_too_large"
    assert client.get(f"/firmware/versions/{version}").json()["has_artifact"] is False


def _web_processes(running) -> list[psutil.Process]:
    root = psutil.Process(running.processes[0].process.pid)
    return [root, *root.children(recursive=True)]


def _peak_rss_reset(process: psutil.Process) -> None:
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def _peak_rss(process: psutil.Process) -> int:
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def test_a_50_mb_download_arrives_whole_while_the_server_holds_a_few_blocks(transfers, released_50_mb):
    running, client = transfers
    version, sha256 = released_50_mb
    processes = _web_processes(running)
    before = {}
    for process in processes:
        _peak_rss_reset(process)
        before[process.pid] = process.memory_info().rss
    digest, size = hashlib.sha256(), 0
    started = time.monotonic()
    with client.stream("GET", f"/firmware/versions/{version}/artifact") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(50 * MiB)
        for chunk in response.iter_raw():
            digest.update(chunk)
            size += len(chunk)
    seconds = time.monotonic() - started
    growth = max(_peak_rss(process) - before[process.pid] for process in processes)
    print(f"\n50 MiB download: {seconds:.2f} s ({50 / seconds:.0f} MiB/s); peak RSS growth {growth / MiB:.1f} MiB")
    assert (size, digest.hexdigest()) == (50 * MiB, sha256)
    assert growth < 12 * MiB, f"the serving process's peak RSS grew by {growth / MiB:.1f} MiB"


def _download_first_mb_and_hang_up(base_url: str, token: str, version: str) -> int:
    """GET the artifact on a raw socket, read about 1 MiB, close the socket; bytes read."""
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            f"GET /firmware/versions/{version}/artifact HTTP/1.1\r\nHost: {address.netloc}\r\n"
            f"Authorization: Token {token}\r\n\r\n".encode()
        )
        received = b""
        while len(received) < MiB:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection first"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    return len(received)


def test_clients_gone_mid_download_give_their_threads_back(transfers, released_50_mb, operator_token):
    """Six downloads abandoned after their first MiB, one after the other, with one request thread per
    process: each is answered, so no earlier one kept its thread; then a whole download still works.
    (That the reading stops and `close()` runs is seen from inside: iot/tests/test_asgi_bridge.py.)"""
    running, client = transfers
    version, sha256 = released_50_mb
    for _ in range(6):
        assert _download_first_mb_and_hang_up(running.base_url, operator_token, version) >= MiB
    assert client.get(f"/firmware/versions/{version}", timeout=10).status_code == 200
    response = client.get(f"/firmware/versions/{version}/artifact", timeout=30)
    assert hashlib.sha256(response.content).hexdigest() == sha256
