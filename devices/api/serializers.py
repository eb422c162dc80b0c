from rest_framework import serializers

from devices.models import DeviceStatus
from iot.api.serializers import JSONObjectField, StrictCharField, StrictInputSerializer, StrictRegexField

VERSION_LABEL = r"^[A-Za-z0-9._+\-]+$"
# A firmware version is an opaque label (no semver ordering is assumed); the refusal says what a label is.
VERSION_LABEL_RULE = "1-64 characters from letters, digits and . _ + - (e.g. 2.0.1 or 2.0.a3f1)"
VERSION_LABEL_ERRORS = {
    "invalid": f"Must be {VERSION_LABEL_RULE}.",
    "blank": f"Must not be blank: {VERSION_LABEL_RULE}.",
    "max_length": f"Must be {VERSION_LABEL_RULE}.",
}


# Declared field by field rather than as a ModelSerializer: this is on the hot path of every
# device read, and building a ModelSerializer's fields costs about 1 ms per response. (A comment,
# not the docstring: the docstring is the schema's description, written for API clients.)
class DeviceSerializer(serializers.Serializer):
    """A device of the fleet."""

    id = serializers.UUIDField(read_only=True)
    serial_number = serializers.CharField(read_only=True)
    device_type = serializers.CharField(read_only=True)
    firmware_version = serializers.CharField(read_only=True)
    status = serializers.ChoiceField(choices=DeviceStatus.choices, read_only=True)
    location = serializers.CharField(read_only=True, allow_null=True)
    group_id = serializers.CharField(read_only=True, allow_null=True)
    metadata = serializers.DictField(read_only=True)
    registered_at = serializers.DateTimeField(read_only=True)
    last_seen = serializers.DateTimeField(read_only=True, allow_null=True)


class DeviceRegistrationResponseSerializer(DeviceSerializer):
    device_token = serializers.CharField(
        read_only=True, help_text="Only in the 201 of a new registration: the device's credential, shown once."
    )


class DeviceRegisterSerializer(StrictInputSerializer):
    """A registration: serial number, type and firmware; location, group and metadata optional."""

    serial_number = StrictCharField(max_length=128, trim_whitespace=True)
    device_type = StrictCharField(max_length=64)
    firmware_version = StrictRegexField(
        VERSION_LABEL, max_length=64, error_messages=VERSION_LABEL_ERRORS, help_text=f"{VERSION_LABEL_RULE}."
    )
    location = StrictCharField(max_length=255, required=False, allow_null=True, allow_blank=True)
    group_id = StrictCharField(max_length=128, required=False, allow_null=True)
    metadata = JSONObjectField(required=False)

    def validate_serial_number(self, value: str) -> str:
        if not value.isprintable():
            raise serializers.ValidationError("Must contain printable characters only.")
        return value


class DeviceUpdateSerializer(StrictInputSerializer):
    """The fields to change (at least one); the others keep their values."""

    min_fields = 1

    location = StrictCharField(max_length=255, required=False, allow_null=True, allow_blank=True)
    status = serializers.ChoiceField(choices=DeviceStatus.choices, required=False)
    group_id = StrictCharField(max_length=128, required=False, allow_null=True)
    metadata = JSONObjectField(required=False)
    device_type = StrictCharField(max_length=64, required=False)
    firmware_version = StrictRegexField(
        VERSION_LABEL,
        max_length=64,
        required=False,
        error_messages=VERSION_LABEL_ERRORS,
        help_text=f"{VERSION_LABEL_RULE}.",
    )

    def validate(self, attrs):
        if len(attrs) < self.min_fields:
            raise serializers.ValidationError(f"Send at least one of: {', '.join(self.fields)}.")
        return attrs


class DeviceListQuerySerializer(StrictInputSerializer):
    serial_number = StrictCharField(
        max_length=128, required=False, help_text="Only the device with exactly this serial number (0 or 1 results)."
    )
    group_id = StrictCharField(max_length=128, required=False, help_text="Only the devices of this group.")
    status = serializers.ChoiceField(choices=DeviceStatus.choices, required=False)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")
