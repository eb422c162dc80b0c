"""Template tags of the admin's fleet pages: the dashboard on the index, and figure formatting."""

from django import template
from django.contrib import admin
from django.template.loader import render_to_string
from django.urls import reverse

from analytics import charts
from analytics.panels import DASHBOARD_REFRESH_SECONDS, fleet_dashboard_context
from devices.models import Device

register = template.Library()

OPERATOR_SYMBOLS = {"gt": ">", "lt": "<", "gte": "≥", "lte": "≤", "eq": "=", "ne": "≠"}


@register.simple_tag(takes_context=True)
def fleet_dashboard(context) -> str:
    """The live fleet dashboard, for whoever may view devices in the admin (else nothing): its first
    paint is rendered here, so it shows at once (and without scripts); the page's script refreshes it."""
    request = context.get("request")
    if request is None or not admin.site.get_model_admin(Device).has_view_permission(request):
        return ""
    return render_to_string(
        "admin/analytics/fleet_dashboard_live.html",
        {
            **fleet_dashboard_context(),
            "live_url": reverse("admin:devices_device_fleet_dashboard"),
            "refresh_seconds": DASHBOARD_REFRESH_SECONDS,
        },
        request=request,
    )


@register.filter
def fleet_number(value) -> str:
    """1234567 -> "1,234,567"; 0.123456 -> "0.123"."""
    return charts.number(value)


@register.filter
def fleet_operator(value: str) -> str:
    return OPERATOR_SYMBOLS.get(value, value)
