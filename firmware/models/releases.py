import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone

VERSION_MAX_LENGTH = 64  # as `Device.firmware_version`
CHECKSUM_MAX_LENGTH = 255


class FirmwareRelease(models.Model):
    """A firmware version that devices can be updated to, and its artifact (the image file).

    `version` is an opaque label (no ordering between labels is assumed), unique in the
    database: two concurrent registrations of one label give one release and one `409`.
    `checksum` is stored exactly as the publisher gave it (`sha256-<hex>`, `sha256:<hex>`,
    plain hex or SRI base64) and checked against the artifact when an update runs
    (`firmware.saga.verify_artifact`), not at registration: a release may be registered
    before its artifact exists, and one whose artifact never matches fails every update.

    The artifact lives in Django's storage (`default_storage`: local disk under `MEDIA_ROOT`,
    or any backend set in `STORAGES`) under a name of our own making (`artifact_name`), never
    one derived from the label. The server computes `artifact_sha256` and `artifact_size`
    while the upload streams in (`firmware.artifacts`), so what is verified is what was
    stored. An artifact is set once (a conditional UPDATE on an empty `artifact_name`): a
    device mid-download must never see the file change under it; a wrong file means a new
    version. The four artifact columns are all set or all empty (a check constraint).

    `created_at` is the publisher's own timestamp for the release (optional in the API);
    `registered_at` is when this platform stored it.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    version = models.CharField(max_length=VERSION_MAX_LENGTH, unique=True)
    checksum = models.CharField(max_length=CHECKSUM_MAX_LENGTH)
    size_bytes = models.BigIntegerField(
        null=True, blank=True, help_text="As declared by the publisher; checked against the artifact at update time."
    )
    release_notes = models.TextField(blank=True, default="")
    min_compatible_version = models.CharField(
        max_length=VERSION_MAX_LENGTH,
        null=True,
        blank=True,
        help_text="Informational: labels are opaque, so no ordering is enforced.",
    )
    created_at = models.DateTimeField(default=timezone.now)
    registered_at = models.DateTimeField(default=timezone.now, editable=False)
    artifact_name = models.CharField(max_length=255, blank=True, default="", editable=False)
    artifact_sha256 = models.CharField(max_length=64, blank=True, default="", editable=False)
    artifact_size = models.BigIntegerField(null=True, blank=True, editable=False)
    artifact_uploaded_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        db_table = "firmware_release"
        ordering = ("-registered_at", "-id")
        constraints = [
            models.CheckConstraint(
                condition=Q(artifact_name="", artifact_sha256="", artifact_size__isnull=True)
                | (~Q(artifact_name="") & ~Q(artifact_sha256="") & Q(artifact_size__isnull=False)),
                name="firmware_release_artifact_all_or_nothing",
            ),
            models.CheckConstraint(
                condition=Q(size_bytes__isnull=True) | Q(size_bytes__gte=0), name="firmware_release_size_not_negative"
            ),
        ]
        indexes = [models.Index(fields=["-registered_at", "-id"], name="firmware_release_registered")]

    def __str__(self) -> str:
        return self.version

    @property
    def has_artifact(self) -> bool:
        return bool(self.artifact_name)
