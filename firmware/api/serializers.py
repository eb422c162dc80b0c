from datetime import timedelta

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from devices.api.serializers import VERSION_LABEL, VERSION_LABEL_ERRORS, VERSION_LABEL_RULE
from firmware.models import ACTIVE_STATUSES, RolloutStatus, UpdateStatus
from firmware.models.releases import CHECKSUM_MAX_LENGTH, VERSION_MAX_LENGTH
from firmware.models.rollouts import ROLLOUT_NAME_MAX_LENGTH
from firmware.models.updates import REASON_MAX_LENGTH
from firmware.rollouts import (
    DEFAULT_ERROR_MIN_FINISHED,
    DEFAULT_ERROR_THRESHOLD,
    DEFAULT_STAGES,
    DEFAULT_SUCCESS_THRESHOLD,
    MAX_STAGES,
    TARGET_DEVICE_STATUSES,
    rollout_stages_problem,
)
from firmware.selectors import RolloutCounts, rollout_counts
from firmware.services import REPORT_STATUSES
from iot.api.serializers import (
    JSON_NUMBER_MAX,
    StrictBooleanField,
    StrictCharField,
    StrictDateTimeField,
    StrictFloatField,
    StrictInputSerializer,
    StrictIntegerField,
    StrictRegexField,
    StrictUUIDField,
)

RELEASE_NOTES_MAX_LENGTH = 20_000
CANCEL_REASON_MAX_LENGTH = 500
# A maintenance window may open up to a year ahead and last up to 30 days.
WINDOW_MAX_AHEAD = timedelta(days=366)
WINDOW_MAX_SECONDS = 30 * 24 * 3600


def _one_of(values) -> dict:
    return {"type": "string", "pattern": f"^({'|'.join(values)})$", "description": f"One of: {', '.join(values)}."}


# Not enums: drf-spectacular makes every enum a component named after its field, and `status` here (two
# choice sets) would collide with the devices' and alerts' `status`: a warning that fails the schema build.
@extend_schema_field(_one_of(UpdateStatus.values))
class UpdateStatusField(serializers.ChoiceField):
    def __init__(self, **kwargs):
        super().__init__(choices=UpdateStatus.choices, **kwargs)


@extend_schema_field(_one_of(REPORT_STATUSES))
class ReportStatusField(serializers.ChoiceField):
    def __init__(self, **kwargs):
        super().__init__(choices=REPORT_STATUSES, **kwargs)


@extend_schema_field(_one_of(RolloutStatus.values))
class RolloutStatusField(serializers.ChoiceField):
    def __init__(self, **kwargs):
        super().__init__(choices=RolloutStatus.choices, **kwargs)


@extend_schema_field(_one_of(TARGET_DEVICE_STATUSES))
class TargetDeviceStatusField(serializers.ChoiceField):
    def __init__(self, **kwargs):
        super().__init__(choices=TARGET_DEVICE_STATUSES, **kwargs)


def _version_field(**kwargs):
    kwargs.setdefault("help_text", f"{VERSION_LABEL_RULE}.")
    return StrictRegexField(VERSION_LABEL, max_length=VERSION_MAX_LENGTH, error_messages=VERSION_LABEL_ERRORS, **kwargs)


# --- Releases ------------------------------------------------------------------------------------


class ReleaseRegisterSerializer(StrictInputSerializer):
    """A release: its version label and checksum (checked against the artifact when an update runs)."""

    version = _version_field()
    checksum = StrictCharField(
        max_length=CHECKSUM_MAX_LENGTH,
        help_text="Stored as given: `sha256-<hex>`, `sha256:<hex>`, 64 hex digits, or `sha256-<base64>`. An update "
        "to this release fails unless the uploaded artifact's SHA-256 is the digest it names.",
    )
    size_bytes = StrictIntegerField(
        min_value=0, max_value=JSON_NUMBER_MAX, required=False, allow_null=True, help_text="Checked like the checksum."
    )
    release_notes = StrictCharField(
        max_length=RELEASE_NOTES_MAX_LENGTH, required=False, allow_blank=True, allow_null=True, trim_whitespace=False
    )
    min_compatible_version = _version_field(required=False, allow_null=True)
    created_at = StrictDateTimeField(required=False, help_text="The publisher's timestamp (default: now).")

    def validate_version(self, value: str) -> str:
        # `.` and `..` are labels no URL can carry (clients resolve them away), so they could never be read back.
        if not any(char.isalnum() for char in value):
            raise serializers.ValidationError("Must contain at least one letter or digit.")
        return value

    def validate_checksum(self, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise serializers.ValidationError("Must be printable characters, not blank.")
        return value


class ReleaseSerializer(serializers.Serializer):
    """A firmware release and its artifact (the server's own SHA-256 and size of the uploaded file)."""

    version = serializers.CharField(read_only=True)
    checksum = serializers.CharField(read_only=True)
    size_bytes = serializers.IntegerField(read_only=True, allow_null=True)
    release_notes = serializers.CharField(read_only=True)
    min_compatible_version = serializers.CharField(read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)
    registered_at = serializers.DateTimeField(read_only=True)
    has_artifact = serializers.BooleanField(read_only=True)
    artifact_sha256 = serializers.SerializerMethodField()
    artifact_size = serializers.IntegerField(read_only=True, allow_null=True)
    artifact_uploaded_at = serializers.DateTimeField(read_only=True, allow_null=True)

    def get_artifact_sha256(self, release) -> str | None:
        return release.artifact_sha256 or None


class ArtifactUploadSerializer(serializers.Serializer):
    """`multipart/form-data` with the image in the field `file`."""

    file = serializers.FileField(help_text="The firmware image; its SHA-256 is computed by the server.")


# --- Updates -------------------------------------------------------------------------------------


class MaintenanceWindowInSerializer(StrictInputSerializer):
    """When the device may install: from `start`, for `duration_seconds` (the window must not be over yet,
    and must open within a year)."""

    start = StrictDateTimeField(help_text="When installing may begin.")
    duration_seconds = StrictIntegerField(min_value=1, max_value=WINDOW_MAX_SECONDS)

    def validate(self, attrs):
        now = timezone.now()
        if attrs["start"] > now + WINDOW_MAX_AHEAD:
            raise serializers.ValidationError("The window must open within a year.")
        if attrs["start"] + timedelta(seconds=attrs["duration_seconds"]) <= now:
            raise serializers.ValidationError("The window is already over.")
        return attrs


@extend_schema_field(MaintenanceWindowInSerializer)
class MaintenanceWindowField(serializers.Field):
    """A maintenance window object; its errors are one flat list of messages naming the member (the shape of
    every validation error: field -> list of strings), not a nested object."""

    def to_internal_value(self, data):
        window = MaintenanceWindowInSerializer(data=data)
        if window.is_valid():
            return window.validated_data
        messages = []
        for name, errors in window.errors.items():
            for error in errors if isinstance(errors, list) else [errors]:
                messages.append(str(error) if name == "non_field_errors" else f"{name}: {error}")
        raise serializers.ValidationError(messages)

    def to_representation(self, value):
        return value


class UpdateCreateSerializer(StrictInputSerializer):
    """Update a device to a release; `force` supersedes the device's active update."""

    device_id = StrictUUIDField()
    to_version = _version_field()
    force = StrictBooleanField(required=False, default=False)
    maintenance_window = MaintenanceWindowField(
        required=False,
        allow_null=True,
        help_text="The device may download at any time but install only inside this window (default: any time).",
    )


class UpdateListQuerySerializer(StrictInputSerializer):
    device_id = StrictUUIDField(required=False, help_text="Only this device's updates.")
    rollout_id = StrictUUIDField(required=False, help_text="Only the updates of this rollout.")
    status = UpdateStatusField(required=False)
    active = serializers.ChoiceField(
        choices=["true", "false"], required=False, help_text="Only active (or only finished) updates."
    )
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")


class ReleaseListQuerySerializer(StrictInputSerializer):
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")


class UpdateCancelSerializer(StrictInputSerializer):
    """Optionally, why (recorded as the update's error)."""

    reason = StrictCharField(
        max_length=CANCEL_REASON_MAX_LENGTH, required=False, help_text="Recorded as the update's error."
    )


class UpdateReportSerializer(StrictInputSerializer):
    """A device's report on its update."""

    status = ReportStatusField(
        help_text="A stage (downloading, downloaded, installing) or the result (installed, failed). A stage "
        "earlier than the update's is ignored (200, the current state).",
    )
    progress = StrictIntegerField(min_value=0, max_value=100, required=False, help_text="Percent.")
    version = _version_field(required=False, help_text="With `installed` (required): the version now running.")
    reason = StrictCharField(
        max_length=REASON_MAX_LENGTH, required=False, allow_blank=True, help_text="With `failed`: why."
    )

    def validate(self, attrs):
        if attrs["status"] == "installed" and not attrs.get("version"):
            raise serializers.ValidationError({"version": ["Required with status installed."]})
        if attrs["status"] != "installed" and "version" in attrs:
            raise serializers.ValidationError({"version": ["Only with status installed."]})
        if attrs["status"] != "failed" and "reason" in attrs:
            raise serializers.ValidationError({"reason": ["Only with status failed."]})
        return attrs


class MaintenanceWindowSerializer(serializers.Serializer):
    start = serializers.DateTimeField(source="maintenance_window_start")
    end = serializers.DateTimeField(source="maintenance_window_end")
    duration_seconds = serializers.SerializerMethodField()

    def get_duration_seconds(self, update) -> int:
        return round((update.maintenance_window_end - update.maintenance_window_start).total_seconds())


class DeviceReportSerializer(serializers.Serializer):
    result = serializers.CharField(source="device_result", allow_null=True, help_text="installed, failed or null.")
    version = serializers.CharField(source="reported_version", allow_null=True)
    reason = serializers.CharField(source="device_reason")
    last_report_at = serializers.DateTimeField(allow_null=True)


class SagaStepSerializer(serializers.Serializer):
    name = serializers.CharField()
    phase = serializers.CharField(help_text="forward or compensate.")
    status = serializers.CharField(help_text="pending, running, waiting, done or failed.")
    attempts = serializers.IntegerField()
    error = serializers.CharField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


class SagaSerializer(serializers.Serializer):
    """The update's saga run and its step log (forward steps, then compensations in reverse order)."""

    id = serializers.UUIDField()
    status = serializers.CharField(help_text="running, compensating, succeeded, compensated or cancelled.")
    current_step = serializers.CharField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    steps = SagaStepSerializer(many=True)


class UpdateSerializer(serializers.Serializer):
    """A firmware update of one device."""

    id = serializers.UUIDField(read_only=True)
    device_id = serializers.UUIDField(read_only=True)
    from_version = serializers.CharField(read_only=True)
    to_version = serializers.CharField(read_only=True)
    status = UpdateStatusField(read_only=True)
    progress = serializers.IntegerField(read_only=True)
    started_at = serializers.DateTimeField(read_only=True)
    completed_at = serializers.DateTimeField(read_only=True, allow_null=True)
    error = serializers.CharField(read_only=True, allow_null=True)
    force = serializers.BooleanField(read_only=True)
    active = serializers.SerializerMethodField()
    dispatched_at = serializers.DateTimeField(read_only=True, allow_null=True)
    cancelled_at = serializers.DateTimeField(read_only=True, allow_null=True)
    superseded_by = serializers.UUIDField(read_only=True, allow_null=True)
    rollout_id = serializers.UUIDField(read_only=True, allow_null=True, help_text="The rollout that started it.")
    maintenance_window = serializers.SerializerMethodField()
    install_allowed = serializers.SerializerMethodField()
    device_report = serializers.SerializerMethodField()

    def get_active(self, update) -> bool:
        """Still in progress (a cancelled one until its compensation has run)."""
        return update.status in ACTIVE_STATUSES

    @extend_schema_field(MaintenanceWindowSerializer(allow_null=True))
    def get_maintenance_window(self, update):
        if update.maintenance_window_start is None:
            return None
        return MaintenanceWindowSerializer(update).data

    def get_install_allowed(self, update) -> bool:
        return update.install_allowed()

    @extend_schema_field(DeviceReportSerializer)
    def get_device_report(self, update):
        return DeviceReportSerializer(update).data


class UpdateDetailSerializer(UpdateSerializer):
    """A firmware update with its saga's step log."""

    saga = serializers.SerializerMethodField()

    @extend_schema_field(SagaSerializer(allow_null=True))
    def get_saga(self, update):
        run = self.context.get("saga")
        return None if run is None else SagaSerializer(run).data


class DeviceUpdateSerializer(serializers.Serializer):
    """The update waiting for the device: what to download, how to check it, whether it may install now."""

    update_id = serializers.UUIDField(source="id")
    from_version = serializers.CharField()
    to_version = serializers.CharField()
    status = UpdateStatusField()
    progress = serializers.IntegerField()
    artifact_url = serializers.SerializerMethodField()
    checksum = serializers.CharField(source="release.checksum", help_text="As the publisher registered it.")
    sha256 = serializers.CharField(source="release.artifact_sha256", help_text="Of the artifact, 64 hex digits.")
    size_bytes = serializers.IntegerField(source="release.artifact_size")
    install_allowed = serializers.SerializerMethodField()
    maintenance_window = serializers.SerializerMethodField()

    def get_artifact_url(self, update) -> str:
        return self.context["artifact_url"]

    def get_install_allowed(self, update) -> bool:
        return update.install_allowed()

    @extend_schema_field(MaintenanceWindowSerializer(allow_null=True))
    def get_maintenance_window(self, update):
        if update.maintenance_window_start is None:
            return None
        return MaintenanceWindowSerializer(update).data


# --- Rollouts ------------------------------------------------------------------------------------


@extend_schema_field(
    {
        "type": "array",
        "items": {"type": "number", "minimum": 0, "maximum": 100, "description": "Above 0, at most 100."},
        "minItems": 1,
        "maxItems": MAX_STAGES,
    }
)
class StagesField(serializers.Field):
    """Cumulative percentages of the targets, strictly increasing, the last 100; one flat list of messages."""

    def to_internal_value(self, data):
        problem = rollout_stages_problem(data)
        if problem is not None:
            raise serializers.ValidationError(problem)
        return [float(percent) for percent in data]

    def to_representation(self, value):
        return value


class RolloutCreateSerializer(StrictInputSerializer):
    """A staged rollout of a release: which devices, in which stages, when to go on and when to stop.

    Targets are the devices (not decommissioned, not on `to_version` already) matching every filter given;
    with none, the whole fleet.
    """

    to_version = _version_field(help_text="The release to roll out (its artifact must be uploaded).")
    name = StrictCharField(max_length=ROLLOUT_NAME_MAX_LENGTH, required=False, help_text="Default: from the target.")
    group_id = StrictCharField(max_length=128, required=False, help_text="Only the devices of this group.")
    device_type = StrictCharField(max_length=64, required=False, help_text="Only the devices of this type.")
    from_version = _version_field(required=False, help_text="Only the devices running this firmware version.")
    device_status = TargetDeviceStatusField(required=False, help_text="Only the devices in this status.")
    stages = StagesField(
        required=False,
        help_text=f"Cumulative percentages of the targets (default {list(DEFAULT_STAGES)}): a stage starts "
        "when the one before reached the success threshold.",
    )
    success_threshold = StrictFloatField(
        min_value=0,
        max_value=1,
        required=False,
        default=DEFAULT_SUCCESS_THRESHOLD,
        help_text="Fraction of a stage's updates that must end installed before the next stage starts.",
    )
    error_threshold = StrictFloatField(
        min_value=0,
        max_value=1,
        required=False,
        default=DEFAULT_ERROR_THRESHOLD,
        help_text="The rollout stops (updates in flight rolled back) when more than this fraction of its finished "
        "updates failed.",
    )
    error_min_finished = StrictIntegerField(
        min_value=1,
        max_value=JSON_NUMBER_MAX,
        required=False,
        default=DEFAULT_ERROR_MIN_FINISHED,
        help_text="Finished updates needed before the error threshold counts (with fewer targets than this it "
        "never does; the stages' success threshold still applies).",
    )
    maintenance_window = MaintenanceWindowField(
        required=False,
        allow_null=True,
        help_text="Passed to every update: devices download at any time but install only inside it.",
    )


class RolloutListQuerySerializer(StrictInputSerializer):
    status = RolloutStatusField(required=False)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")


class RolloutCancelSerializer(StrictInputSerializer):
    """Optionally, why (recorded as the rollout's `stop_reason` and its cancelled updates' error)."""

    reason = StrictCharField(max_length=CANCEL_REASON_MAX_LENGTH, required=False)


class RolloutEmptySerializer(StrictInputSerializer):
    """No fields (an empty object, or no body)."""


class RolloutCountsSerializer(serializers.Serializer):
    """Targets by where they are: not started yet, their update's status, or skipped (the device had another
    active update, or was gone, when its stage came)."""

    not_started = serializers.IntegerField()
    pending = serializers.IntegerField()
    downloading = serializers.IntegerField()
    downloaded = serializers.IntegerField()
    installing = serializers.IntegerField()
    installed = serializers.IntegerField()
    failed = serializers.IntegerField()
    rolled_back = serializers.IntegerField()
    skipped = serializers.IntegerField()

    def to_representation(self, counts: RolloutCounts):
        return counts.as_dict()


def _progress_fields(counts: RolloutCounts) -> dict:
    return {
        "targets": counts.targets,
        "counts": counts.as_dict(),
        "success_rate": counts.success_rate,
        "failure_rate": counts.failure_rate,
    }


class RolloutStageSerializer(serializers.Serializer):
    stage = serializers.IntegerField(help_text="1 for the first stage.")
    percent = serializers.FloatField(help_text="Cumulative share of the targets.")
    state = serializers.CharField(help_text="waiting (not started), running, or passed.")
    targets = serializers.IntegerField()
    counts = RolloutCountsSerializer()
    success_rate = serializers.FloatField(
        allow_null=True, help_text="installed / updates (rolled-back left out): compared with success_threshold."
    )
    failure_rate = serializers.FloatField(allow_null=True, help_text="failed / (installed + failed).")
    started_at = serializers.DateTimeField(allow_null=True)
    passed_at = serializers.DateTimeField(allow_null=True)

    def to_representation(self, stage):
        return {
            "stage": stage.index + 1,
            "percent": stage.percent,
            "state": stage.state,
            **_progress_fields(stage.counts),
            "started_at": serializers.DateTimeField().to_representation(stage.started_at) if stage.started_at else None,
            "passed_at": serializers.DateTimeField().to_representation(stage.passed_at) if stage.passed_at else None,
        }


class RolloutProgressSerializer(serializers.Serializer):
    """Where the rollout's targets are; `per_stage` in a single rollout's answer only."""

    targets = serializers.IntegerField()
    counts = RolloutCountsSerializer()
    success_rate = serializers.FloatField(
        allow_null=True, help_text="installed / updates, rolled-back ones left out (null before any update)."
    )
    failure_rate = serializers.FloatField(
        allow_null=True, help_text="failed / (installed + failed): compared with error_threshold."
    )
    per_stage = RolloutStageSerializer(many=True, required=False)


class RolloutTargetSerializer(serializers.Serializer):
    group_id = serializers.CharField(allow_null=True)
    device_type = serializers.CharField(allow_null=True)
    from_version = serializers.CharField(allow_null=True)
    device_status = serializers.CharField(allow_null=True)


class RolloutWindowSerializer(serializers.Serializer):
    start = serializers.DateTimeField(source="maintenance_window_start")
    end = serializers.DateTimeField(source="maintenance_window_end")
    duration_seconds = serializers.SerializerMethodField()

    def get_duration_seconds(self, rollout) -> int:
        return round((rollout.maintenance_window_end - rollout.maintenance_window_start).total_seconds())


class RolloutSerializer(serializers.Serializer):
    """A staged rollout and its progress (`context["progress"]`: with `per_stage`; else the list's counts)."""

    id = serializers.UUIDField(read_only=True)
    name = serializers.CharField(read_only=True)
    to_version = serializers.CharField(read_only=True)
    status = RolloutStatusField(
        read_only=True,
        help_text="running, paused, completed, stopped (error threshold, a stage that could not pass, its window "
        "closed) or cancelled.",
    )
    stop_reason = serializers.CharField(read_only=True)
    target = serializers.SerializerMethodField()
    stages = serializers.SerializerMethodField()
    current_stage = serializers.SerializerMethodField()
    success_threshold = serializers.FloatField(read_only=True)
    error_threshold = serializers.FloatField(read_only=True)
    error_min_finished = serializers.IntegerField(read_only=True)
    maintenance_window = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)
    finished_at = serializers.DateTimeField(read_only=True, allow_null=True)
    settled_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="When it had ended and none of its updates was in flight any more."
    )
    progress = serializers.SerializerMethodField()

    @extend_schema_field(RolloutTargetSerializer)
    def get_target(self, rollout):
        return RolloutTargetSerializer(rollout).data

    def get_stages(self, rollout) -> list[float]:
        return [stage.percent for stage in sorted(rollout.stages.all(), key=lambda stage: stage.index)]

    def get_current_stage(self, rollout) -> int:
        """1 for the first stage."""
        return rollout.current_stage + 1

    @extend_schema_field(RolloutWindowSerializer(allow_null=True))
    def get_maintenance_window(self, rollout):
        if rollout.maintenance_window_start is None:
            return None
        return RolloutWindowSerializer(rollout).data

    @extend_schema_field(RolloutProgressSerializer)
    def get_progress(self, rollout):
        progress = self.context.get("progress")
        if progress is None:
            return _progress_fields(rollout_counts(rollout))
        return {
            **_progress_fields(progress.counts),
            "per_stage": [RolloutStageSerializer(stage).data for stage in progress.stages],
        }
