from django.conf import settings
from rest_framework import serializers

from iot.api.serializers import StrictInputSerializer, StrictRegexField
from telemetry.api.validation import METRIC_PATTERN
from telemetry.models import METRIC_MAX_LENGTH, TelemetryPoint


class TelemetryPointSerializer(serializers.ModelSerializer):
    """A stored point as API clients read it."""

    timestamp = serializers.DateTimeField(source="ts")

    class Meta:
        model = TelemetryPoint
        fields = ("device_id", "metric", "timestamp", "value", "received_at")
        read_only_fields = fields


class TelemetryQuerySerializer(StrictInputSerializer):
    """Query parameters of `GET /telemetry/{device_id}` (a timestamp without offset means UTC)."""

    metric = StrictRegexField(rf"^{METRIC_PATTERN}\Z", max_length=METRIC_MAX_LENGTH, required=False)
    start_time = serializers.DateTimeField(required=False)
    end_time = serializers.DateTimeField(required=False)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=100)

    def validate(self, attrs):
        start, end = attrs.get("start_time"), attrs.get("end_time")
        if start is not None and end is not None and start > end:
            raise serializers.ValidationError({"end_time": ["Must not be before start_time."]})
        return attrs


# --- OpenAPI only (the ingestion bodies are validated by telemetry.api.validation) ---------
# Strict like the validator: unknown fields are refused, so the schema says additionalProperties: false.


class PointInSerializer(StrictInputSerializer):
    """One point of one device."""

    device_id = serializers.UUIDField()
    timestamp = serializers.DateTimeField(help_text="ISO 8601; without an offset it means UTC.")
    metric = serializers.RegexField(rf"^{METRIC_PATTERN}$", max_length=METRIC_MAX_LENGTH)
    value = serializers.FloatField(help_text="A finite number (no NaN/Infinity, no booleans or strings).")


class BatchPointInSerializer(PointInSerializer):
    """A point of a batch (its device is the batch's)."""

    device_id = serializers.UUIDField(required=False, help_text="Optional; must equal the batch's device_id.")


class BatchInSerializer(StrictInputSerializer):
    """Points of one device, stored all or nothing."""

    device_id = serializers.UUIDField()
    points = BatchPointInSerializer(
        many=True,
        min_length=1,
        max_length=settings.TELEMETRY_BATCH_MAX_POINTS,
        help_text=f"1 to TELEMETRY_BATCH_MAX_POINTS ({settings.TELEMETRY_BATCH_MAX_POINTS}) points.",
    )


class AcceptedSerializer(serializers.Serializer):
    status = serializers.CharField(default="accepted")


class BatchAcceptedSerializer(AcceptedSerializer):
    count = serializers.IntegerField()
