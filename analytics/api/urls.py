from django.urls import path

from analytics.api.views import DeviceAnalyticsView, FleetAnalyticsView, GroupAnalyticsView

urlpatterns = [
    path("analytics/fleet", FleetAnalyticsView.as_view(), name="analytics-fleet"),
    path("analytics/groups/<str:group_id>", GroupAnalyticsView.as_view(), name="analytics-group"),
    path("analytics/devices/<str:device_id>", DeviceAnalyticsView.as_view(), name="analytics-device"),
]
