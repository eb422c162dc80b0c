"""Fleet managers' pages in the admin, behind the admin's own login and permissions.

* The admin's index is the fleet dashboard (`admin.site.index_template`; the models list stays below
  it): devices by status, points received per minute over the last hour, open alerts by severity and
  the newest ones, firmware versions across the fleet, updates in progress, devices not seen
  recently. Drawn on the server (`analytics.charts`, SVG), refreshed every few seconds from a
  fragment view by a small script of ours (`analytics/static/analytics/fleet.js`).
* A device's change page shows its telemetry per metric (with a 1 h / 24 h / 7 d picker), its
  alerts and its firmware update history, below its fields.

Whoever may view devices in the admin (superusers, staff with `devices.view_device` or
`devices.change_device`) sees both; other staff get the admin's plain index, and 403 from the views.

The device admin is the devices app's (`devices.admin.DeviceAdmin`), re-registered here with the
panels added: devices must not import analytics (the import-linter layers), so the panels are
contributed from this side.
"""

import uuid

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse

from analytics.dashboard import fleet_dashboard, time_range_parse
from analytics.panels import (
    DASHBOARD_REFRESH_SECONDS,
    DEVICE_PANELS_REFRESH_SECONDS,
    device_panels_context,
    fleet_dashboard_context,
    fleet_dashboard_json,
)
from devices.admin import DeviceAdmin
from devices.models import Device

# The index keeps Django's context (the models list, recent actions); the template adds the dashboard.
admin.site.index_template = "admin/analytics/index.html"


class FleetDeviceAdmin(DeviceAdmin):
    """`DeviceAdmin` plus the fleet dashboard's views and the device page's panels."""

    change_form_template = "admin/analytics/device/change_form.html"

    def get_urls(self):
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            # Before the base URLs: their `<path:object_id>/` would take these paths for an object id.
            path("fleet-dashboard/", wrap(self.fleet_dashboard_view), name=f"{prefix}_fleet_dashboard"),
            path("fleet-dashboard.json", wrap(self.fleet_dashboard_json_view), name=f"{prefix}_fleet_dashboard_json"),
            path("<path:object_id>/panels/", wrap(self.device_panels_view), name=f"{prefix}_panels"),
            *super().get_urls(),
        ]

    def _require_view(self, request) -> None:
        if not self.has_view_permission(request):
            raise PermissionDenied

    def fleet_dashboard_view(self, request):
        """The dashboard's HTML fragment, as the index shows it: what the page's script polls."""
        self._require_view(request)
        context = {**fleet_dashboard_context(), "fragment": True}
        return TemplateResponse(request, "admin/analytics/fleet_dashboard.html", context)

    def fleet_dashboard_json_view(self, request):
        self._require_view(request)
        return JsonResponse(fleet_dashboard_json(fleet_dashboard()), encoder=DjangoJSONEncoder)

    def device_panels_view(self, request, object_id):
        """A device's panels (HTML fragment) for the picked time range: what the device page polls."""
        self._require_view(request)
        device_id = _device_id(object_id)
        if device_id is None or not Device.objects.filter(pk=device_id).exists():
            return HttpResponse("No device with this id.", status=404, content_type="text/plain")
        context = _device_panels(request, device_id)
        return TemplateResponse(request, "admin/analytics/device_panels.html", context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        device_id = _device_id(object_id)
        # A POST saves and redirects (or shows the form's errors): the panels are for reading the page.
        if request.method == "GET" and device_id is not None and self.has_view_permission(request):
            extra_context = {**(extra_context or {}), **_device_panels(request, device_id)}
        return super().change_view(request, object_id, form_url, extra_context)


def _device_id(object_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(object_id))
    except ValueError:
        return None


def _device_panels(request, device_id: uuid.UUID) -> dict:
    time_range = time_range_parse(request.GET.get("range"))
    panels_url = reverse("admin:devices_device_panels", args=[device_id])
    return {
        **device_panels_context(device_id=device_id, time_range=time_range),
        "panels_url": panels_url,
        "panels_refresh_seconds": DEVICE_PANELS_REFRESH_SECONDS,
    }


admin.site.unregister(Device)
admin.site.register(Device, FleetDeviceAdmin)

__all__ = ["DASHBOARD_REFRESH_SECONDS", "FleetDeviceAdmin"]
