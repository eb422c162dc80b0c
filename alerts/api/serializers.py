import uuid

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from alerts.models import GROUP_ID_MAX_LENGTH, AlertOperator, AlertSeverity, AlertStatus, NotificationChannelKind
from alerts.services import channel_breaker_name
from iot.api.serializers import (
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictInputSerializer,
    StrictRegexField,
    StrictUUIDField,
)
from telemetry.api.validation import METRIC_ERROR, METRIC_PATTERN

MAX_CHANNELS_PER_RULE = 20
COMMENT_MAX_LENGTH = 1000


# Not an `enum`: drf-spectacular makes every enum a component named after its field, and the
# devices' `status` (other choices, several components) would collide with this one: a warning that
# fails the schema build. The clean fix is `ENUM_NAME_OVERRIDES` in SPECTACULAR_SETTINGS
# ({"DeviceStatusEnum": "devices.models.DeviceStatus", "AlertStatusEnum": "alerts.models.AlertStatus"}),
# asked of the lead (iot/settings.py); then this field can be a plain ChoiceField again.
@extend_schema_field(
    {
        "type": "string",
        "pattern": f"^({'|'.join(AlertStatus.values)})$",
        "description": f"One of: {', '.join(AlertStatus.values)}.",
    }
)
class AlertStatusField(serializers.ChoiceField):
    def __init__(self, **kwargs):
        super().__init__(choices=AlertStatus.choices, **kwargs)


class UUIDListField(serializers.ListField):
    """A list of UUID strings. A bad item is reported as one flat message naming its index, the shape
    of every other validation error (DRF's ListField answers `{"<index>": [...]}` instead)."""

    def __init__(self, **kwargs):
        super().__init__(child=StrictUUIDField(), **kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, list):
            self.fail("not_a_list", input_type=type(data).__name__)
        if self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        bad = [index for index, item in enumerate(data) if not isinstance(item, str) or _as_uuid(item) is None]
        if bad:
            listed = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise serializers.ValidationError(f"Must be a list of UUID strings; not at index {listed}.")
        return [uuid.UUID(item) for item in data]


def _as_uuid(raw: str) -> uuid.UUID | None:
    if len(raw) > 45:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


def _metric_field(**kwargs):
    return StrictRegexField(
        rf"^{METRIC_PATTERN}\Z",
        error_messages={"invalid": METRIC_ERROR, "blank": METRIC_ERROR},
        help_text="The telemetry metric the rule watches.",
        trim_whitespace=False,  # refused, as ingestion refuses it, rather than quietly another name
        **kwargs,
    )


def _group_id_field(**kwargs):
    return StrictCharField(max_length=GROUP_ID_MAX_LENGTH, **kwargs)


def _exactly_one(attrs: dict, names: tuple[str, ...]) -> None:
    if sum(attrs.get(name) is not None for name in names) != 1:
        raise serializers.ValidationError(f"Send exactly one of {', '.join(names)}.")


# --- Rules ---------------------------------------------------------------------------------------


class AlertRuleSerializer(serializers.Serializer):
    """A rule: `metric operator threshold` on a device or on every device of a group."""

    id = serializers.UUIDField(read_only=True)
    device_id = serializers.UUIDField(read_only=True, allow_null=True)
    group_id = serializers.CharField(read_only=True, allow_null=True)
    metric = serializers.CharField(read_only=True)
    operator = serializers.ChoiceField(choices=AlertOperator.choices, read_only=True)
    threshold = serializers.FloatField(read_only=True)
    severity = serializers.ChoiceField(choices=AlertSeverity.choices, read_only=True)
    channel_ids = serializers.SerializerMethodField()
    enabled = serializers.BooleanField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)
    version = serializers.IntegerField(read_only=True)

    @extend_schema_field(serializers.ListField(child=serializers.UUIDField()))
    def get_channel_ids(self, rule) -> list[str]:
        return sorted(str(channel.pk) for channel in rule.channels.all())


class AlertRuleCreateSerializer(StrictInputSerializer):
    """A new rule: exactly one of `device_id` and `group_id`; `severity` defaults to `warning`."""

    device_id = StrictUUIDField(required=False, allow_null=True)
    group_id = _group_id_field(required=False, allow_null=True)
    metric = _metric_field()
    operator = serializers.ChoiceField(choices=AlertOperator.choices)
    threshold = StrictFloatField()
    severity = serializers.ChoiceField(choices=AlertSeverity.choices, required=False)
    channel_ids = UUIDListField(required=False, max_length=MAX_CHANNELS_PER_RULE)
    enabled = StrictBooleanField(required=False)

    def validate(self, attrs):
        _exactly_one(attrs, ("device_id", "group_id"))
        return attrs


class AlertRuleUpdateSerializer(StrictInputSerializer):
    """The fields to change (at least one). A rule's device or group never changes: create another rule."""

    min_fields = 1
    FIXED = ("device_id", "group_id")

    metric = _metric_field(required=False)
    operator = serializers.ChoiceField(choices=AlertOperator.choices, required=False)
    threshold = StrictFloatField(required=False)
    severity = serializers.ChoiceField(choices=AlertSeverity.choices, required=False)
    channel_ids = UUIDListField(required=False, max_length=MAX_CHANNELS_PER_RULE)
    enabled = StrictBooleanField(required=False)

    def to_internal_value(self, data):
        if isinstance(data, dict):
            fixed = [name for name in self.FIXED if name in data]
            if fixed:
                message = "A rule's device or group cannot change; create a new rule (and delete this one)."
                raise serializers.ValidationError({name: [message] for name in fixed})
        return super().to_internal_value(data)

    def validate(self, attrs):
        if len(attrs) < self.min_fields:
            raise serializers.ValidationError(f"Send at least one of: {', '.join(self.fields)}.")
        return attrs


class AlertRuleListQuerySerializer(StrictInputSerializer):
    device_id = StrictUUIDField(required=False, help_text="Only the rules of this device (not its group's).")
    group_id = _group_id_field(required=False, help_text="Only the rules of this group.")
    enabled = serializers.ChoiceField(choices=["true", "false"], required=False)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")


# --- Alerts --------------------------------------------------------------------------------------


class AlertSerializer(serializers.Serializer):
    """An alert: one episode of a rule violated on a device, from its first violation until resolved."""

    id = serializers.UUIDField(read_only=True)
    rule_id = serializers.UUIDField(read_only=True)
    device_id = serializers.UUIDField(read_only=True)
    status = AlertStatusField(read_only=True)
    severity = serializers.ChoiceField(choices=AlertSeverity.choices, read_only=True)
    metric = serializers.CharField(read_only=True)
    operator = serializers.ChoiceField(choices=AlertOperator.choices, read_only=True)
    threshold = serializers.FloatField(read_only=True, help_text="The rule's threshold when the alert opened.")
    occurrences = serializers.IntegerField(read_only=True, help_text="Violating points since it opened.")
    first_value = serializers.FloatField(read_only=True)
    last_value = serializers.FloatField(read_only=True)
    first_triggered_at = serializers.DateTimeField(read_only=True, help_text="The first violating point's timestamp.")
    last_triggered_at = serializers.DateTimeField(read_only=True, help_text="The newest violating point's timestamp.")
    created_at = serializers.DateTimeField(read_only=True)
    acknowledged_at = serializers.DateTimeField(read_only=True, allow_null=True)
    acknowledged_by = serializers.SerializerMethodField()
    resolved_at = serializers.DateTimeField(read_only=True, allow_null=True)
    resolved_by = serializers.SerializerMethodField()

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_acknowledged_by(self, alert) -> str | None:
        return alert.acknowledged_by.get_username() if alert.acknowledged_by_id else None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_resolved_by(self, alert) -> str | None:
        return alert.resolved_by.get_username() if alert.resolved_by_id else None


class AlertListQuerySerializer(StrictInputSerializer):
    device_id = StrictUUIDField(required=False, help_text="Only this device's alerts.")
    rule_id = StrictUUIDField(required=False, help_text="Only this rule's alerts.")
    status = AlertStatusField(required=False)
    severity = serializers.ChoiceField(choices=AlertSeverity.choices, required=False)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")


class EmptyBodySerializer(StrictInputSerializer):
    """No fields: an empty body, `{}`, or none at all."""


# --- Silences ------------------------------------------------------------------------------------


class SilenceSerializer(serializers.Serializer):
    """Notifications for one rule, device or group are held back from `starts_at` until `ends_at`."""

    id = serializers.UUIDField(read_only=True)
    rule_id = serializers.UUIDField(read_only=True, allow_null=True)
    device_id = serializers.UUIDField(read_only=True, allow_null=True)
    group_id = serializers.CharField(read_only=True, allow_null=True)
    starts_at = serializers.DateTimeField(read_only=True)
    ends_at = serializers.DateTimeField(read_only=True)
    state = serializers.SerializerMethodField()
    comment = serializers.CharField(read_only=True)
    created_by = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField(read_only=True)

    @extend_schema_field(serializers.ChoiceField(choices=["pending", "active", "expired"]))
    def get_state(self, silence) -> str:
        now = timezone.now()
        if silence.ends_at <= now:
            return "expired"
        return "active" if silence.starts_at <= now else "pending"

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_created_by(self, silence) -> str | None:
        return silence.created_by.get_username() if silence.created_by_id else None


class SilenceCreateSerializer(StrictInputSerializer):
    """A silence of exactly one of a rule, a device or a group, until `ends_at` (from `starts_at`, default now)."""

    rule_id = StrictUUIDField(required=False, allow_null=True)
    device_id = StrictUUIDField(required=False, allow_null=True)
    group_id = _group_id_field(required=False, allow_null=True)
    starts_at = serializers.DateTimeField(required=False)
    ends_at = serializers.DateTimeField()
    comment = StrictCharField(required=False, allow_blank=True, max_length=COMMENT_MAX_LENGTH)

    def validate(self, attrs):
        _exactly_one(attrs, ("rule_id", "device_id", "group_id"))
        starts_at = attrs.get("starts_at") or timezone.now()
        if attrs["ends_at"] <= starts_at:
            raise serializers.ValidationError({"ends_at": ["Must be later than starts_at (default: now)."]})
        return attrs


class SilenceListQuerySerializer(StrictInputSerializer):
    state = serializers.ChoiceField(
        choices=["active", "inactive"], required=False, help_text="`active`: in force now; `inactive`: not (yet)."
    )
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")


# --- Notification channels ---------------------------------------------------------------------


class NotificationChannelCreateSerializer(StrictInputSerializer):
    """`webhook`: a JSON POST naming the new alerts is sent to `url` (checked by the SSRF guard now and at
    every delivery). `email`: `url` is `mailto:` and one or more comma-separated addresses; a plain-text
    message naming the alerts, with the same JSON attached, goes through the platform's mail server."""

    name = StrictCharField(max_length=128)
    kind = serializers.ChoiceField(choices=NotificationChannelKind.choices)
    url = StrictCharField(max_length=2048)


class NotificationChannelSerializer(serializers.Serializer):
    """A channel, with the state of its circuit breaker (shared by every process)."""

    id = serializers.UUIDField(read_only=True)
    name = serializers.CharField(read_only=True)
    kind = serializers.CharField(read_only=True)
    url = serializers.CharField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    breaker_state = serializers.SerializerMethodField()

    @extend_schema_field(serializers.ChoiceField(choices=["closed", "open", "half_open"]))
    def get_breaker_state(self, channel) -> str:
        # Read for a whole page in one round trip by the view (`breaker_states`), passed in the context.
        return self.context["breaker_states"][channel_breaker_name(channel.pk)]


class ChannelListQuerySerializer(StrictInputSerializer):
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, help_text="Page size (default 100).")
    cursor = serializers.CharField(required=False, help_text="From a page's `next`/`previous` link, unchanged.")
