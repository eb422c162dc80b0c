"""Artifact plumbing: the upload handler hashes while it spools to disk and stops at the limit; checksums parse."""

import base64
import hashlib
import os

import pytest

from firmware.artifacts import (
    FirmwareArtifactTooLarge,
    HashedUploadedFile,
    HashingUploadHandler,
    artifact_storage_name,
    checksum_sha256_hex,
)
from firmware.testing import artifact_bytes

DIGEST = hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    ("checksum", "expected"),
    [
        (f"sha256-{DIGEST}", DIGEST),
        (f"sha256:{DIGEST.upper()}", DIGEST),
        (f"SHA-256:{DIGEST}", DIGEST),
        (f"  {DIGEST}  ", DIGEST),
        ("sha256-" + base64.b64encode(bytes.fromhex(DIGEST)).decode(), DIGEST),
        ("sha256-" + base64.urlsafe_b64encode(bytes.fromhex(DIGEST)).decode().rstrip("="), DIGEST),
        ("sha256-1a2b3c4d", None),  # the seed's bogus checksum
        (f"md5:{DIGEST[:32]}", None),
        (DIGEST[:63], None),
        ("sha256-" + base64.b64encode(b"x" * 31).decode(), None),
        ("", None),
    ],
)
def test_checksum_spellings(checksum, expected):
    assert checksum_sha256_hex(checksum) == expected


def receive(handler: HashingUploadHandler, content: bytes, chunk: int = 1000) -> HashedUploadedFile:
    handler.new_file("file", "image.bin", "application/octet-stream", len(content))
    for start in range(0, len(content), chunk):
        handler.receive_data_chunk(content[start : start + chunk], start)
    return handler.file_complete(len(content))


def test_the_handler_spools_to_disk_and_hashes_on_the_way():
    content = artifact_bytes(50_000)
    upload = receive(HashingUploadHandler(max_bytes=50_000), content)
    assert isinstance(upload, HashedUploadedFile)
    assert upload.sha256 == hashlib.sha256(content).hexdigest() and upload.size == 50_000
    assert os.path.getsize(upload.temporary_file_path()) == 50_000  # on disk, not in memory
    assert upload.read() == content
    upload.close()


def test_the_handler_stops_at_the_limit_and_leaves_no_file():
    handler = HashingUploadHandler(max_bytes=2500)
    with pytest.raises(FirmwareArtifactTooLarge) as refused:
        receive(handler, artifact_bytes(3000))
    assert refused.value.status_code == 413
    assert not os.path.exists(handler.file.temporary_file_path())


def test_storage_names_are_ours_and_fresh():
    import uuid

    release_id = uuid.uuid4()
    first, second = artifact_storage_name(release_id=release_id), artifact_storage_name(release_id=release_id)
    assert first != second and first.startswith(f"firmware/{release_id}/") and ".." not in first
