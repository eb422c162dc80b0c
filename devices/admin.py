from django import forms
from django.contrib import admin, messages
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from devices.models import Device, DeviceStatus
from devices.services import device_bulk_delete, device_bulk_update, device_delete, device_update


class AssignGroupForm(forms.Form):
    group_id = forms.CharField(max_length=128, required=False, help_text="Empty removes the group.")


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    """Fleet managers' view of the registry. Writes go through the services (cache-safe)."""

    list_display = ("serial_number", "device_type", "status", "firmware_version", "group_id", "location", "last_seen")
    list_filter = ("status", "device_type", "group_id", "firmware_version")
    search_fields = ("serial_number",)
    search_help_text = "Search by serial number (prefix or exact)."
    ordering = ("-registered_at",)
    list_per_page = 100
    show_full_result_count = False  # COUNT(*) over a large fleet on every page load is what makes admins crawl
    readonly_fields = ("id", "serial_number", "telemetry", "registered_at", "last_seen", "updated_at", "version")
    fields = (
        "id",
        "serial_number",
        "telemetry",
        "device_type",
        "firmware_version",
        "status",
        "location",
        "group_id",
        "metadata",
        "registered_at",
        "last_seen",
        "updated_at",
        "version",
    )
    actions = [
        "assign_group",
        *(f"set_status_{choice.value}" for choice in DeviceStatus if choice != DeviceStatus.REGISTERED),
    ]

    def has_add_permission(self, request):
        # Devices register themselves through the API (which issues their credential).
        return False

    def add_view(self, request, form_url="", extra_context=None):
        # The add button is hidden; someone who follows an old link or types the URL is told
        # how devices get registered, on the list, rather than shown a bare "403 Forbidden".
        self.message_user(
            request,
            "Devices are not added here: a device registers through the API (POST /devices, see /api/docs), "
            "which issues its credential.",
            messages.WARNING,
        )
        return redirect("admin:devices_device_changelist")

    @admin.display(description="Telemetry")
    def telemetry(self, obj):
        # By URL name: the devices app does not import the telemetry app that builds on it.
        try:
            url = reverse("admin:telemetry_telemetrypoint_changelist")
        except NoReverseMatch:
            return "-"
        return format_html('<a href="{}?q={}">Recent points of this device</a>', url, obj.pk)

    # Deleting goes through the service, which makes every process forget the device at
    # once; the ORM's delete would leave it in the read cache (readable, and its credential
    # accepted) until the entry expired. `delete_queryset` is what "Delete selected" calls.
    def delete_model(self, request, obj):
        try:
            device_delete(device_id=obj.pk)
        except Device.DoesNotExist:
            pass  # deleted meanwhile (another admin, a double submit): the outcome asked for

    def delete_queryset(self, request, queryset):
        device_bulk_delete(device_ids=list(queryset.values_list("pk", flat=True)))

    def save_model(self, request, obj, form, change):
        changes = {name: form.cleaned_data[name] for name in form.changed_data if name in form.cleaned_data}
        if changes:
            updated = device_update(device_id=obj.pk, changes=changes)
            obj.version = updated.version

    @admin.action(description="Assign selected devices to a group")
    def assign_group(self, request, queryset):
        if "apply" in request.POST:
            form = AssignGroupForm(request.POST)
            if form.is_valid():
                count = device_bulk_update(
                    device_ids=list(queryset.values_list("pk", flat=True)),
                    changes={"group_id": form.cleaned_data["group_id"] or None},
                )
                self.message_user(request, f"{count} device(s) assigned.", messages.SUCCESS)
                return None
        else:
            form = AssignGroupForm()
        return render(
            request,
            "admin/devices/assign_group.html",
            {**self.admin_site.each_context(request), "form": form, "devices": queryset, "title": "Assign group"},
        )

    def _set_status(self, request, queryset, status):
        count = device_bulk_update(device_ids=list(queryset.values_list("pk", flat=True)), changes={"status": status})
        self.message_user(request, f"{count} device(s) set to {status}.", messages.SUCCESS)


def _status_action(status: DeviceStatus):
    def action(modeladmin, request, queryset):
        modeladmin._set_status(request, queryset, status.value)

    action.__name__ = f"set_status_{status.value}"
    return admin.action(description=f"Set status: {status.label}")(action)


for _status in DeviceStatus:
    if _status != DeviceStatus.REGISTERED:
        setattr(DeviceAdmin, f"set_status_{_status.value}", _status_action(_status))
