"""Operators' view of releases (with artifact upload) and updates (with their saga's step log).

Every write goes through `firmware.services`, as the API's do: a release saved by the ORM would
skip the artifact's hashing, and an update's status belongs to its saga alone.
"""

import re

from django import forms
from django.contrib import admin, messages
from django.utils.html import format_html, format_html_join

from devices.api.serializers import VERSION_LABEL, VERSION_LABEL_RULE
from firmware.models import FirmwareRelease, FirmwareUpdate
from firmware.selectors import update_saga
from firmware.services import (
    FirmwareUpdateConflict,
    FirmwareUpdateNotFound,
    firmware_artifact_attach,
    firmware_release_delete,
    firmware_release_register,
    firmware_update_cancel,
)
from iot.errors import ServiceError

_VERSION = re.compile(VERSION_LABEL)
RELEASE_FIELDS = ("version", "checksum", "size_bytes", "release_notes", "min_compatible_version", "created_at")


class FirmwareReleaseForm(forms.ModelForm):
    artifact = forms.FileField(
        required=False,
        help_text="The firmware image. Its SHA-256 and size are computed on upload; it can be set once.",
    )

    class Meta:
        model = FirmwareRelease
        fields = RELEASE_FIELDS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["created_at"].required = False  # default: now
        if not self.instance._state.adding:
            # A release is immutable once registered (devices may be updating to it); only a missing
            # artifact can still be added.
            for name in RELEASE_FIELDS:
                self.fields[name].disabled = True

    def _label(self, name: str) -> str | None:
        value = self.cleaned_data.get(name)
        if value and not _VERSION.match(value):
            raise forms.ValidationError(f"Must be {VERSION_LABEL_RULE}.")
        return value

    def clean_version(self):
        return self._label("version")

    def clean_min_compatible_version(self):
        return self._label("min_compatible_version") or None

    def clean_checksum(self):
        checksum = self.cleaned_data["checksum"]
        if not checksum.strip() or not checksum.isprintable():
            raise forms.ValidationError("Must be printable characters, not blank.")
        return checksum


@admin.register(FirmwareRelease)
class FirmwareReleaseAdmin(admin.ModelAdmin):
    form = FirmwareReleaseForm
    list_display = ("version", "checksum", "size_bytes", "has_artifact", "artifact_size", "registered_at")
    search_fields = ("version",)
    readonly_fields = ("id", "registered_at", "artifact_sha256", "artifact_size", "artifact_uploaded_at")
    list_per_page = 100

    def get_fields(self, request, obj=None):
        fields = list(super().get_fields(request, obj))
        if obj is not None and obj.artifact_name:
            fields.remove("artifact")  # set once
        return fields

    @admin.display(boolean=True, description="artifact")
    def has_artifact(self, release: FirmwareRelease) -> bool:
        return release.has_artifact

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        try:
            if not change:
                release = firmware_release_register(
                    version=data["version"],
                    checksum=data["checksum"],
                    size_bytes=data.get("size_bytes"),
                    release_notes=data.get("release_notes") or "",
                    min_compatible_version=data.get("min_compatible_version"),
                    created_at=data.get("created_at"),
                )
                obj.pk = release.pk
            if data.get("artifact"):
                firmware_artifact_attach(version=obj.version, file=data["artifact"])
        except ServiceError as exc:
            self.message_user(request, exc.detail, messages.ERROR)

    def delete_model(self, request, obj):
        try:
            firmware_release_delete(version=obj.version)
        except ServiceError as exc:
            self.message_user(request, exc.detail, messages.ERROR)

    def delete_queryset(self, request, queryset):
        for version in queryset.values_list("version", flat=True):
            self.delete_model(request, FirmwareRelease(version=version))


@admin.register(FirmwareUpdate)
class FirmwareUpdateAdmin(admin.ModelAdmin):
    list_display = ("id", "device", "from_version", "to_version", "status", "progress", "started_at", "completed_at")
    list_filter = ("status",)
    search_fields = ("=device__serial_number", "=to_version")
    search_help_text = "Search by a device's exact serial number or the exact target version."
    list_select_related = ("device",)
    list_per_page = 100
    show_full_result_count = False
    actions = ["cancel"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in FirmwareUpdate._meta.fields] + ["saga_log"]

    def has_add_permission(self, request):
        return False  # updates are started through the API (POST /firmware/updates), which starts their saga

    def has_delete_permission(self, request, obj=None):
        return False  # the record of what was done to a device; it goes with its device

    def save_model(self, request, obj, form, change):
        pass  # never written from a form: the saga owns the status

    @admin.display(description="saga step log")
    def saga_log(self, update: FirmwareUpdate) -> str:
        run = update_saga(update=update)
        if run is None:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (step.name, step.phase, step.status, step.attempts, step.finished_at or "", step.error or "")
                for step in run.steps
            ),
        )
        return format_html(
            "<p>run {} &middot; {}{}</p><table><thead><tr><th>step</th><th>phase</th><th>status</th>"
            "<th>attempts</th><th>finished</th><th>error</th></tr></thead><tbody>{}</tbody></table>",
            run.id,
            run.status,
            f" ({run.error})" if run.error else "",
            rows,
        )

    @admin.action(description="Cancel selected updates (their completed steps are rolled back)", permissions=["change"])
    def cancel(self, request, queryset):
        done, refused = 0, []
        for update_id in queryset.values_list("pk", flat=True):
            try:
                firmware_update_cancel(update_id=update_id, reason=f"cancelled by {request.user}")
                done += 1
            except (FirmwareUpdateConflict, FirmwareUpdateNotFound) as exc:
                refused.append(exc.detail)
        if done:
            self.message_user(request, f"{done} update(s) cancelled; rolling back.", messages.SUCCESS)
        if refused:
            self.message_user(request, f"{len(refused)} not cancelled: {refused[0]}", messages.WARNING)
