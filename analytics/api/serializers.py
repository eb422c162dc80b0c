"""Analytics responses (read only), per ../shared/CONTRACT.md plus a few fields the dashboard uses."""

from rest_framework import serializers


class FleetAnalyticsSerializer(serializers.Serializer):
    total_devices = serializers.IntegerField()
    active_devices = serializers.IntegerField(help_text="Devices with a point within DEVICE_INACTIVE_AFTER_SECONDS.")
    inactive_devices = serializers.IntegerField(help_text="Devices silent for longer than that.")
    devices_by_status = serializers.DictField(child=serializers.IntegerField())
    total_messages = serializers.IntegerField(help_text="Points received, exact (reconciled from the database).")
    messages_per_second = serializers.FloatField(help_text="Points received per second over the recent window.")
    average_latency_ms = serializers.FloatField(
        allow_null=True, help_text="Mean time from a point's timestamp to its receipt."
    )
    active_alerts = serializers.IntegerField(help_text="Open or acknowledged alerts.")
    pending_updates = serializers.IntegerField(help_text="Firmware updates not finished yet.")
    average_uptime_seconds = serializers.FloatField(help_text="Mean of last_seen - registered_at (0 if never seen).")


class GroupAnalyticsSerializer(serializers.Serializer):
    group_id = serializers.CharField()
    device_count = serializers.IntegerField()
    active_count = serializers.IntegerField()
    total_messages = serializers.IntegerField()
    alert_count = serializers.IntegerField(help_text="Open or acknowledged alerts of the group's devices.")
    average_uptime_seconds = serializers.FloatField()


class DeviceAnalyticsSerializer(serializers.Serializer):
    device_id = serializers.UUIDField()
    status = serializers.CharField()
    uptime_seconds = serializers.FloatField(help_text="last_seen - registered_at (0 if never seen).")
    message_count = serializers.IntegerField()
    last_seen = serializers.DateTimeField(allow_null=True)
    error_count = serializers.IntegerField(
        help_text="Points refused (invalid, rate limited, backpressure) over the last 7 days."
    )
    average_latency_ms = serializers.FloatField(allow_null=True)
