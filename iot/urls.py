from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from iot import health, metrics

handler400 = "iot.api.exceptions.json_bad_request"
handler403 = "iot.api.exceptions.json_permission_denied"
handler404 = "iot.api.exceptions.json_not_found"
handler500 = "iot.api.exceptions.json_server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("api/schema", SpectacularAPIView.as_view(permission_classes=[]), name="schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[]), name="swagger-ui"),
    path("api/redoc", SpectacularRedocView.as_view(url_name="schema", permission_classes=[]), name="redoc"),
    path("", include("devices.api.urls")),
    path("", include("telemetry.api.urls")),
]
