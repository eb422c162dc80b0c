"""Artifact files: hashing uploads as they stream in, reading a release's checksum, storage names.

An upload is never held in memory: `HashingUploadHandler` (the only upload handler of the
artifact endpoint) writes each chunk to a temporary file as it arrives, feeding the same chunk
to SHA-256 and counting its size, and refuses the request as soon as it passes
`FIRMWARE_ARTIFACT_MAX_BYTES` (413). The service then copies the file into Django's storage
(`default_storage`: `FileSystemStorage` under `MEDIA_ROOT` by default, any django-storages
backend through `STORAGES`), which reads it in chunks too.
"""

import base64
import binascii
import hashlib
import re
import uuid

from django.core.files import File
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.core.files.uploadhandler import FileUploadHandler, TemporaryFileUploadHandler

from iot.errors import ServiceError

_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_PREFIXES = ("sha256-", "sha256:", "sha-256-", "sha-256:")


class FirmwareArtifactTooLarge(ServiceError):
    """The artifact is larger than `FIRMWARE_ARTIFACT_MAX_BYTES` (413); nothing was stored."""

    status_code = 413
    code = "artifact_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"The artifact is larger than the limit of {max_bytes} bytes.", max_bytes=max_bytes)


def checksum_sha256_hex(checksum: str) -> str | None:
    """The SHA-256 digest a release's checksum names, as 64 lowercase hex digits; None if it names none.

    Accepted: `sha256-<hex>`, `sha256:<hex>` (also `sha-256`, any case), plain hex, and after a
    prefix the base64 form of Subresource Integrity (`sha256-<base64>`). Anything else (another
    algorithm, a truncated digest like the seed's `sha256-1a2b3c4d`) names no SHA-256 digest, and
    an update to that release fails its verification.
    """
    text = checksum.strip()
    lowered = text.lower()
    body, prefixed = text, False
    for prefix in _PREFIXES:
        if lowered.startswith(prefix):
            body, prefixed = text[len(prefix) :], True
            break
    if _HEX_SHA256.fullmatch(body):
        return body.lower()
    if prefixed:
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decode(body.encode("ascii") + b"=" * (-len(body) % 4))
            except (binascii.Error, ValueError, UnicodeEncodeError):
                continue
            if len(raw) == 32:
                return raw.hex()
    return None


def sha256_of(file: File) -> tuple[str, int]:
    """(hex digest, size) of a file read in chunks from its start; leaves it at its start again."""
    digest, size = hashlib.sha256(), 0
    file.seek(0)
    for chunk in file.chunks():
        digest.update(chunk)
        size += len(chunk)
    file.seek(0)
    return digest.hexdigest(), size


def artifact_storage_name(*, release_id: uuid.UUID) -> str:
    """Where a release's artifact goes in the storage: names of our making only (a label such as
    `..` never becomes a path), and a fresh one per upload, so a file left by an upload whose
    transaction failed never collides with the next."""
    return f"firmware/{release_id}/{uuid.uuid4().hex}.bin"


class HashedUploadedFile(TemporaryUploadedFile):
    """An upload spooled to disk whose SHA-256 (`sha256`, hex) was computed as it arrived."""

    sha256: str = ""


class HashingUploadHandler(TemporaryFileUploadHandler):
    """Streams each uploaded file to a temporary file, hashing and counting as it goes.

    Raises `FirmwareArtifactTooLarge` (413) from inside the multipart parser as soon as the
    file passes `max_bytes`, so an oversized upload is not read to its end.
    """

    def __init__(self, request=None, *, max_bytes: int) -> None:
        super().__init__(request)
        self.max_bytes = max_bytes
        self._digest = hashlib.sha256()
        self._received = 0

    def new_file(self, *args, **kwargs):
        FileUploadHandler.new_file(self, *args, **kwargs)
        self._digest = hashlib.sha256()
        self._received = 0
        self.file = HashedUploadedFile(self.file_name, self.content_type, 0, self.charset, self.content_type_extra)

    def receive_data_chunk(self, raw_data, start):
        self._received += len(raw_data)
        if self._received > self.max_bytes:
            self.file.close()  # a named temporary file: closing it deletes it
            raise FirmwareArtifactTooLarge(self.max_bytes)
        self._digest.update(raw_data)
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size):
        upload = super().file_complete(file_size)
        upload.sha256 = self._digest.hexdigest()
        return upload
