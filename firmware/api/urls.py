from django.urls import path, re_path

from firmware.api.views import (
    ArtifactView,
    DeviceUpdateView,
    ReleaseDetailView,
    ReleaseListView,
    ReleaseRegisterView,
    RolloutCancelView,
    RolloutDetailView,
    RolloutListCreateView,
    RolloutPauseView,
    RolloutResumeView,
    UpdateCancelView,
    UpdateDetailView,
    UpdateListCreateView,
    UpdateReportView,
)

# A version label (devices.api.serializers.VERSION_LABEL, at most 64 characters); any other
# path segment names no release (404).
VERSION = r"(?P<version>[A-Za-z0-9._+\-]{1,64})"

urlpatterns = [
    path("firmware/register", ReleaseRegisterView.as_view(), name="firmware-register"),
    path("firmware/versions", ReleaseListView.as_view(), name="firmware-versions"),
    re_path(rf"^firmware/versions/{VERSION}$", ReleaseDetailView.as_view(), name="firmware-version"),
    re_path(rf"^firmware/versions/{VERSION}/artifact$", ArtifactView.as_view(), name="firmware-artifact"),
    path("firmware/updates", UpdateListCreateView.as_view(), name="firmware-updates"),
    path("firmware/updates/<str:update_id>", UpdateDetailView.as_view(), name="firmware-update"),
    path("firmware/updates/<str:update_id>/cancel", UpdateCancelView.as_view(), name="firmware-update-cancel"),
    path("firmware/updates/<str:update_id>/report", UpdateReportView.as_view(), name="firmware-update-report"),
    path("firmware/device/update", DeviceUpdateView.as_view(), name="firmware-device-update"),
    path("firmware/rollouts", RolloutListCreateView.as_view(), name="firmware-rollouts"),
    path("firmware/rollouts/<str:rollout_id>", RolloutDetailView.as_view(), name="firmware-rollout"),
    path("firmware/rollouts/<str:rollout_id>/pause", RolloutPauseView.as_view(), name="firmware-rollout-pause"),
    path("firmware/rollouts/<str:rollout_id>/resume", RolloutResumeView.as_view(), name="firmware-rollout-resume"),
    path("firmware/rollouts/<str:rollout_id>/cancel", RolloutCancelView.as_view(), name="firmware-rollout-cancel"),
]
