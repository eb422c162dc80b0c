"""Operators' view of rules, alerts and silences. Every write goes through `alerts.services`.

The ORM's own `save()` would be wrong here: a rule saved directly would not bump its
scope's version, so ingestion would go on evaluating the old rule from the cache; an
alert saved from a form would write back the `occurrences` it was read with,
losing the counts added since.
"""

from django import forms
from django.contrib import admin, messages

from alerts.models import Alert, AlertRule, Notification, NotificationChannel, Silence
from alerts.services import (
    AlertNotFound,
    AlertRuleNotFound,
    AlertTransitionConflict,
    alert_acknowledge,
    alert_resolve,
    alert_rule_create,
    alert_rule_delete,
    alert_rule_update,
    channel_breaker_name,
    notification_channel_delete,
    silence_create,
    silence_expire,
)
from iot.circuit_breaker import breaker_state
from iot.errors import ServiceError
from iot.outbound import outbound_url_validate


class NotificationChannelForm(forms.ModelForm):
    class Meta:
        model = NotificationChannel
        fields = ("name", "kind", "url")

    def clean_url(self):
        url = self.cleaned_data["url"]
        try:
            outbound_url_validate(url)  # the SSRF guard, as the API applies it
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        return url


@admin.register(NotificationChannel)
class NotificationChannelAdmin(admin.ModelAdmin):
    """Channels with their circuit breakers' state (Redis, shared by every process: one read per row)."""

    form = NotificationChannelForm
    list_display = ("name", "kind", "url", "breaker_state", "created_at")
    list_filter = ("kind",)
    search_fields = ("name",)
    readonly_fields = ("id", "breaker_state", "created_at")

    @admin.display(description="circuit breaker")
    def breaker_state(self, channel: NotificationChannel) -> str:
        if channel.pk is None:
            return "-"
        return breaker_state(name=channel_breaker_name(channel.pk)).replace("_", "-")

    def delete_model(self, request, obj):
        try:
            notification_channel_delete(channel_id=obj.pk)
        except ServiceError as exc:
            self.message_user(request, str(exc), messages.ERROR)

    def delete_queryset(self, request, queryset):
        for channel in queryset:
            self.delete_model(request, channel)


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    """The outbox, read-only: rows are written with their alerts and changed only by delivery."""

    list_display = ("id", "channel", "status", "attempts", "next_attempt_at", "expires_at", "created_at")
    list_filter = ("status",)
    list_select_related = ("channel",)
    readonly_fields = [field.name for field in Notification._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class AlertRuleForm(forms.ModelForm):
    channels = forms.ModelMultipleChoiceField(
        queryset=NotificationChannel.objects.all(), required=False, widget=forms.CheckboxSelectMultiple
    )

    class Meta:
        model = AlertRule
        fields = ("device", "group_id", "metric", "operator", "threshold", "severity", "enabled")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.instance._state.adding:
            self.fields["channels"].initial = list(self.instance.channels.all())
            # A rule's target never changes (its cache scope would): create another rule instead.
            for name in ("device", "group_id"):
                self.fields[name].disabled = True

    def clean(self):
        cleaned = super().clean()
        if self.instance._state.adding and (cleaned.get("device") is None) == (not cleaned.get("group_id")):
            raise forms.ValidationError("Choose exactly one of a device and a group.")
        return cleaned


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    form = AlertRuleForm
    list_display = ("__str__", "severity", "enabled", "device", "group_id", "updated_at")
    list_filter = ("severity", "enabled", "operator", "metric")
    search_fields = ("group_id", "metric", "=device__serial_number")
    search_help_text = "Search by group, metric, or a device's exact serial number."
    raw_id_fields = ("device",)
    readonly_fields = ("id", "created_at", "updated_at", "version")
    list_per_page = 100
    show_full_result_count = False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        channel_ids = [channel.pk for channel in data.get("channels") or []]
        fields = {name: data[name] for name in ("metric", "operator", "threshold", "severity", "enabled")}
        try:
            if change:
                saved = alert_rule_update(rule_id=obj.pk, changes={**fields, "channel_ids": channel_ids})
            else:
                device = data.get("device")
                saved = alert_rule_create(
                    device_id=device.pk if device else None,
                    group_id=data.get("group_id") or None,
                    channel_ids=channel_ids,
                    **fields,
                )
        except ServiceError as exc:
            # Gone meanwhile, or a channel deleted meanwhile: nothing was saved.
            self.message_user(request, exc.detail, messages.ERROR)
            return
        obj.pk, obj.version = saved.pk, saved.version

    def save_related(self, request, form, formsets, change):
        pass  # the channels were set by the service, in the rule's transaction

    def delete_model(self, request, obj):
        try:
            alert_rule_delete(rule_id=obj.pk)
        except AlertRuleNotFound:
            pass  # deleted meanwhile: the outcome asked for

    def delete_queryset(self, request, queryset):
        for rule_id in queryset.values_list("pk", flat=True):
            self.delete_model(request, AlertRule(pk=rule_id))


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ("metric", "device", "status", "severity", "occurrences", "last_value", "created_at")
    list_filter = ("status", "severity", "metric")
    search_fields = ("=device__serial_number", "=rule__id")
    search_help_text = "Search by a device's exact serial number or a rule id."
    list_select_related = ("device",)
    list_per_page = 100
    show_full_result_count = False
    actions = ["acknowledge", "resolve"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in Alert._meta.fields]

    def has_add_permission(self, request):
        return False  # alerts come from ingested points

    def save_model(self, request, obj, form, change):
        pass  # never written from a form (see the module docstring); transitions are the actions

    def _transition(self, request, queryset, service, verb: str) -> None:
        done, refused = 0, []
        for alert_id in queryset.values_list("pk", flat=True):
            try:
                service(alert_id=alert_id, by=request.user)
                done += 1
            except (AlertTransitionConflict, AlertNotFound) as exc:
                refused.append(exc.detail)
        if done:
            self.message_user(request, f"{done} alert(s) {verb}.", messages.SUCCESS)
        if refused:
            self.message_user(request, f"{len(refused)} not {verb}: {refused[0]}", messages.WARNING)

    @admin.action(description="Acknowledge selected open alerts", permissions=["change"])
    def acknowledge(self, request, queryset):
        self._transition(request, queryset, alert_acknowledge, "acknowledged")

    @admin.action(description="Resolve selected alerts", permissions=["change"])
    def resolve(self, request, queryset):
        self._transition(request, queryset, alert_resolve, "resolved")


class SilenceForm(forms.ModelForm):
    class Meta:
        model = Silence
        fields = ("rule", "device", "group_id", "starts_at", "ends_at", "comment")

    def clean(self):
        cleaned = super().clean()
        targets = [cleaned.get("rule"), cleaned.get("device"), cleaned.get("group_id") or None]
        if sum(target is not None for target in targets) != 1:
            raise forms.ValidationError("Choose exactly one of a rule, a device and a group.")
        if cleaned.get("starts_at") and cleaned.get("ends_at") and cleaned["ends_at"] <= cleaned["starts_at"]:
            self.add_error("ends_at", "Must be later than the start.")
        return cleaned


@admin.register(Silence)
class SilenceAdmin(admin.ModelAdmin):
    form = SilenceForm
    list_display = ("__str__", "starts_at", "ends_at", "created_by", "comment")
    list_filter = ("ends_at",)
    raw_id_fields = ("rule", "device")
    actions = ["expire"]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return [field.name for field in Silence._meta.fields]  # a silence is expired, not edited

    def save_model(self, request, obj, form, change):
        if change:
            return
        data = form.cleaned_data
        try:
            saved = silence_create(
                rule_id=data["rule"].pk if data.get("rule") else None,
                device_id=data["device"].pk if data.get("device") else None,
                group_id=data.get("group_id") or None,
                starts_at=data.get("starts_at"),
                ends_at=data["ends_at"],
                comment=data.get("comment") or "",
                created_by=request.user,
            )
        except ServiceError as exc:
            self.message_user(request, exc.detail, messages.ERROR)
            return
        obj.pk = saved.pk

    @admin.action(description="Expire selected silences now", permissions=["change"])
    def expire(self, request, queryset):
        count = 0
        for silence_id in queryset.values_list("pk", flat=True):
            silence_expire(silence_id=silence_id)
            count += 1
        self.message_user(request, f"{count} silence(s) expired.", messages.SUCCESS)
