from django.contrib import admin
from django.http import Http404
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import Resolver404, include, path, re_path, resolve
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from iot import health, metrics
from iot.api import exceptions

ADMIN_PREFIX = "admin/"

# The site has no HTML home page: the admin's "View site" link leads to the API docs.
admin.site.site_url = "/api/docs"


# API clients get JSON errors; the admin's pages (a forbidden action, an unknown object)
# get Django's HTML ones instead of a JSON body rendered in the browser.
def _is_admin(request) -> bool:
    return request.path_info.startswith("/" + ADMIN_PREFIX)


def bad_request(request, exception=None):
    if _is_admin(request):
        return defaults.bad_request(request, exception)
    return exceptions.json_bad_request(request, exception)


def permission_denied(request, exception=None):
    if _is_admin(request):
        return defaults.permission_denied(request, exception)
    return exceptions.json_permission_denied(request, exception)


def page_not_found(request, exception=None):
    if _is_admin(request):
        return defaults.page_not_found(request, exception)
    return exceptions.json_not_found(request, exception)


def server_error(request):
    if _is_admin(request):
        return defaults.server_error(request)
    return exceptions.json_server_error(request)


handler400 = bad_request
handler403 = permission_denied
handler404 = page_not_found
handler500 = server_error


@csrf_exempt  # the target view's own CSRF policy is applied below
def without_trailing_slash(request, path):
    """`/devices/` is served as `/devices`, for every method.

    The contract gives paths without a trailing slash and says the same path with one
    must not be a dead end. A redirect would do for a browser, but device HTTP clients
    commonly don't follow one on a POST (or turn it into a GET, dropping the body), so
    the request is served in place: resolved again without its one trailing slash and
    handed to that view, which sees the canonical path (its links and the request
    metrics' route are those of the path without the slash).
    """
    canonical = "/" + path
    try:
        match = resolve(canonical)
    except Resolver404:
        raise Http404 from None
    if not getattr(match.func, "csrf_exempt", False):
        rejected = CsrfViewMiddleware(lambda request: None).process_view(request, match.func, match.args, match.kwargs)
        if rejected is not None:
            return rejected
    request.path_info = canonical
    request.path = request.path[:-1]
    request.resolver_match = match
    return match.func(request, *match.args, **match.kwargs)


urlpatterns = [
    path(ADMIN_PREFIX, admin.site.urls),
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("api/schema", SpectacularAPIView.as_view(permission_classes=[]), name="schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[]), name="swagger-ui"),
    path(
        "api/redoc",
        SpectacularRedocView.as_view(url_name="schema", permission_classes=[], template_name="iot/redoc.html"),
        name="redoc",
    ),
    path("", include("devices.api.urls")),
    path("", include("telemetry.api.urls")),
    path("", include("alerts.api.urls")),
    path("", include("firmware.api.urls")),
    path("", include("analytics.api.urls")),
    path("", include("mqtt.api.urls")),
    # Keep last: only a path nothing above matched comes here (one trailing slash, not "//").
    re_path(r"^(?P<path>.*[^/])/$", without_trailing_slash),
]
