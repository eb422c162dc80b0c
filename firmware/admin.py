"""Operators' view of releases (with artifact upload), updates (with their saga's step log) and staged
rollouts (progress, stages; pause, resume, cancel).

Every write goes through `firmware.services` / `firmware.rollouts`, as the API's do: a release saved by
the ORM would skip the artifact's hashing, an update's status belongs to its saga alone, and a
rollout's to its advance.
"""

import re

from django import forms
from django.contrib import admin, messages
from django.utils.html import format_html, format_html_join

from devices.api.serializers import VERSION_LABEL, VERSION_LABEL_RULE
from firmware.models import FirmwareRelease, FirmwareRollout, FirmwareUpdate
from firmware.rollouts import (
    RolloutConflict,
    RolloutNotFound,
    firmware_rollout_cancel,
    firmware_rollout_pause,
    firmware_rollout_resume,
)
from firmware.selectors import RolloutCounts, rollout_counts, rollout_list, rollout_progress, update_saga
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


# The progress bar's segments, in order: (count attribute, label, colour). Admin CSS variables, so dark mode
# follows; the in-flight and not-started parts use the admin's own neutral colours.
_PROGRESS_SEGMENTS = (
    ("installed", "installed", "var(--message-success-bg, #dfd)"),
    ("failed", "failed", "var(--message-error-bg, #ffefef)"),
    ("rolled_back", "rolled back", "var(--message-warning-bg, #ffc)"),
    ("in_flight", "in flight", "var(--selected-row, #ffc)"),
    ("skipped", "skipped", "var(--darkened-bg, #f8f8f8)"),
)


def _progress_bar(counts: RolloutCounts):
    total = max(counts.targets, 1)
    segments = format_html_join(
        "",
        '<span title="{} {}" style="display:inline-block;height:100%;width:{}%;background:{};'
        'border-right:1px solid var(--border-color, #ccc)"></span>',
        (
            (getattr(counts, name), label, f"{100 * getattr(counts, name) / total:.2f}", colour)
            for name, label, colour in _PROGRESS_SEGMENTS
            if getattr(counts, name)
        ),
    )
    legend = ", ".join(
        f"{getattr(counts, name)} {label}" for name, label, _ in _PROGRESS_SEGMENTS if getattr(counts, name)
    )
    return format_html(
        '<div class="rollout-progress" role="progressbar" aria-valuemin="0" aria-valuemax="{}" aria-valuenow="{}" '
        'style="width:14em;height:0.9em;border:1px solid var(--border-color, #ccc);white-space:nowrap;'
        'overflow:hidden;font-size:0">{}</div><span class="rollout-progress-legend">{} of {} targets{}</span>',
        counts.targets,
        counts.done,
        segments,
        counts.done,
        counts.targets,
        f": {legend}" if legend else "",
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


@admin.register(FirmwareRollout)
class FirmwareRolloutAdmin(admin.ModelAdmin):
    """Staged rollouts: started through the API (`POST /firmware/rollouts`); watched, paused, resumed and
    cancelled here. The list's counts come with the page's rows (one GROUP BY query)."""

    list_display = ("name", "to_version", "status", "stage", "progress", "failure_rate", "created_at")
    list_filter = ("status",)
    search_fields = ("=to_version", "name")
    search_help_text = "Search by the exact target version, or a part of the name."
    list_per_page = 50
    actions = ["pause", "resume", "cancel"]
    fields = (
        "id",
        "name",
        "to_version",
        "status",
        "stop_reason",
        "target",
        "thresholds",
        "maintenance_window",
        "progress",
        "stages_table",
        "requested_by",
        "created_at",
        "updated_at",
        "finished_at",
        "settled_at",
    )

    def get_queryset(self, request):
        return rollout_list()

    def get_readonly_fields(self, request, obj=None):
        return self.fields

    def has_add_permission(self, request):
        return False  # started through the API (POST /firmware/rollouts), which resolves the targets

    def has_delete_permission(self, request, obj=None):
        return False  # the record of what was done to the fleet

    def save_model(self, request, obj, form, change):
        pass  # never written from a form: pause, resume and cancel are actions

    @admin.display(description="stage")
    def stage(self, rollout: FirmwareRollout) -> str:
        stages = sorted(rollout.stages.all(), key=lambda stage: stage.index)
        if not stages:
            return "-"
        current = stages[min(rollout.current_stage, len(stages) - 1)]
        return f"{current.index + 1} of {len(stages)} ({current.percent:g}%)"

    @admin.display(description="progress")
    def progress(self, rollout: FirmwareRollout):
        return _progress_bar(rollout_counts(rollout))

    @admin.display(description="failure rate")
    def failure_rate(self, rollout: FirmwareRollout) -> str:
        return _rate(rollout_counts(rollout).failure_rate)

    @admin.display(description="target")
    def target(self, rollout: FirmwareRollout) -> str:
        filters = [
            f"{name} = {value}"
            for name, value in (
                ("group", rollout.group_id),
                ("type", rollout.device_type),
                ("from version", rollout.from_version),
                ("status", rollout.device_status),
            )
            if value is not None
        ]
        return f"{rollout.target_count} devices ({'; '.join(filters) or 'the whole fleet'})"

    @admin.display(description="thresholds")
    def thresholds(self, rollout: FirmwareRollout) -> str:
        return (
            f"a stage passes at {rollout.success_threshold:.0%} installed; stops past {rollout.error_threshold:.0%} "
            f"failed (after {rollout.error_min_finished} finished)"
        )

    @admin.display(description="maintenance window")
    def maintenance_window(self, rollout: FirmwareRollout) -> str:
        if rollout.maintenance_window_start is None:
            return "none (install at any time)"
        return f"{rollout.maintenance_window_start.isoformat()} to {rollout.maintenance_window_end.isoformat()}"

    @admin.display(description="stages")
    def stages_table(self, rollout: FirmwareRollout):
        progress = rollout_progress(rollout=rollout)
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    stage.index + 1,
                    f"{stage.percent:g}",
                    stage.state,
                    stage.counts.targets,
                    stage.counts.in_flight,
                    stage.counts.installed,
                    stage.counts.failed,
                    stage.counts.rolled_back,
                    stage.counts.skipped,
                    _rate(stage.counts.success_rate),
                    stage.passed_at or stage.started_at or "",
                )
                for stage in progress.stages
            ),
        )
        return format_html(
            "<table><thead><tr><th>stage</th><th>cumulative</th><th>state</th><th>targets</th><th>in flight</th>"
            "<th>installed</th><th>failed</th><th>rolled back</th><th>skipped</th><th>success rate</th>"
            "<th>started / passed</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    def _act(self, request, queryset, service, verb: str) -> None:
        done, refused = 0, []
        for rollout_id in queryset.values_list("pk", flat=True):
            try:
                service(rollout_id=rollout_id)
                done += 1
            except (RolloutConflict, RolloutNotFound) as exc:
                refused.append(exc.detail)
        if done:
            self.message_user(request, f"{done} rollout(s) {verb}.", messages.SUCCESS)
        if refused:
            self.message_user(request, f"{len(refused)} not {verb}: {refused[0]}", messages.WARNING)

    @admin.action(description="Pause selected rollouts (updates in flight go on)", permissions=["change"])
    def pause(self, request, queryset):
        self._act(request, queryset, firmware_rollout_pause, "paused")

    @admin.action(description="Resume selected rollouts", permissions=["change"])
    def resume(self, request, queryset):
        self._act(request, queryset, firmware_rollout_resume, "resumed")

    @admin.action(description="Cancel selected rollouts (updates in flight are rolled back)", permissions=["change"])
    def cancel(self, request, queryset):
        def cancel_one(*, rollout_id):
            return firmware_rollout_cancel(rollout_id=rollout_id, reason=f"cancelled by {request.user}")

        self._act(request, queryset, cancel_one, "cancelled")
