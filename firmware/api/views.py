"""Firmware HTTP API: releases and artifacts, updates and staged rollouts (operators), and the
device-facing side.

Operators (`Token`): register releases, upload artifacts, start, list, read and cancel
updates; start, list, read, pause, resume and cancel staged rollouts. Devices
(`Device <token>`): poll their pending update (`GET /firmware/device/update`), download its
artifact, report progress and the result (`POST /firmware/updates/{id}/report`), read their
own updates.

Status codes: `400` bad input (nothing stored); `403` a device on an operator endpoint, on
another device's update, or downloading a release it was not offered; `404` unknown release,
update or rollout (a malformed id or version names nothing either); `409` a duplicate version, a
second artifact, an active update when `force` is not set, a transition the update's or
rollout's state does not allow (cancelling a finished update, a report on a finished, cancelled
or withdrawn update, installing outside the maintenance window, resuming a stopped rollout);
`413` an artifact past `FIRMWARE_ARTIFACT_MAX_BYTES`; `422` an update or rollout naming an
unknown device or version, a rollout whose release has no artifact or whose target is empty.
"""

import uuid

from django.conf import settings
from django.http import FileResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.generics import GenericAPIView
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from firmware import rollouts, selectors, services
from firmware.api.serializers import (
    ArtifactUploadSerializer,
    DeviceUpdateSerializer,
    ReleaseListQuerySerializer,
    ReleaseRegisterSerializer,
    ReleaseSerializer,
    RolloutCancelSerializer,
    RolloutCreateSerializer,
    RolloutEmptySerializer,
    RolloutListQuerySerializer,
    RolloutSerializer,
    UpdateCancelSerializer,
    UpdateCreateSerializer,
    UpdateDetailSerializer,
    UpdateListQuerySerializer,
    UpdateReportSerializer,
    UpdateSerializer,
)
from firmware.artifacts import HashingUploadHandler
from iot.api.pagination import LimitCursorPagination
from iot.api.permissions import IsOperatorOrDevice, is_device
from iot.api.schema import BAD_QUERY, MALFORMED_BODY, UNSUPPORTED_MEDIA, error_responses

RELEASE_NOT_FOUND = "No release with this version."
UPDATE_NOT_FOUND = "No firmware update with this id (a malformed id names none either)."
VERSION = OpenApiParameter(
    "version",
    # At least one letter or digit: `.` and `..` are not labels a URL can carry (clients resolve them away).
    {"type": "string", "pattern": r"^[A-Za-z0-9._+\-]*[A-Za-z0-9][A-Za-z0-9._+\-]*$", "maxLength": 64},
    OpenApiParameter.PATH,
    description="The release's version label.",
)
UPDATE_ID = OpenApiParameter("update_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The update's id.")
ROLLOUT_NOT_FOUND = "No rollout with this id (a malformed id names none either)."
ROLLOUT_ID = OpenApiParameter("rollout_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The rollout's id.")


def _parse_update_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound(UPDATE_NOT_FOUND) from exc


def _body(serializer_class, request) -> dict:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _query(serializer_class, request) -> dict:
    query = serializer_class(data=request.query_params.dict())
    query.is_valid(raise_exception=True)
    return query.validated_data


def _release(version: str):
    release = selectors.release_get(version=version)
    if release is None:
        raise NotFound(RELEASE_NOT_FOUND)
    return release


def _device_only(request) -> uuid.UUID:
    if not is_device(request.user):
        raise PermissionDenied("This endpoint is for devices (Authorization: Device <token>).")
    return request.user.device_id


class RegisteredOrderPagination(LimitCursorPagination):
    ordering = ("-registered_at", "-id")


class StartedOrderPagination(LimitCursorPagination):
    ordering = ("-started_at", "-id")


class CreatedOrderPagination(LimitCursorPagination):
    ordering = ("-created_at", "-id")


# --- Releases ------------------------------------------------------------------------------------


class ReleaseRegisterView(APIView):
    @extend_schema(
        request=ReleaseRegisterSerializer,
        responses={
            201: ReleaseSerializer,
            **error_responses(
                {
                    400: f"{MALFORMED_BODY} Or a version that is not a label.",
                    409: "This version is already registered (`code: version_exists`).",
                    415: UNSUPPORTED_MEDIA,
                }
            ),
        },
        description="Register a release. Its artifact is uploaded separately "
        "(`PUT /firmware/versions/{version}/artifact`), before or after devices are told about it; "
        "the checksum is checked against it when an update runs.",
    )
    def post(self, request):
        fields = _body(ReleaseRegisterSerializer, request)
        release = services.firmware_release_register(**fields)
        return Response(ReleaseSerializer(release).data, status=status.HTTP_201_CREATED)


class ReleaseListView(GenericAPIView):
    serializer_class = ReleaseSerializer
    pagination_class = RegisteredOrderPagination

    @extend_schema(
        parameters=[ReleaseListQuerySerializer],
        responses={200: ReleaseSerializer(many=True), **error_responses({400: f"{BAD_QUERY} Or a bad cursor."})},
        description="Releases, newest registration first, a page at a time: follow `next` (an opaque cursor).",
    )
    def get(self, request):
        _query(ReleaseListQuerySerializer, request)
        page = self.paginate_queryset(selectors.release_list())
        return self.get_paginated_response(ReleaseSerializer(page, many=True).data)


class ReleaseDetailView(APIView):
    @extend_schema(
        parameters=[VERSION], responses={200: ReleaseSerializer, **error_responses({404: RELEASE_NOT_FOUND})}
    )
    def get(self, request, version: str):
        return Response(ReleaseSerializer(_release(version)).data)


ARTIFACT_UPLOAD_RESPONSES = {
    201: ReleaseSerializer,
    **error_responses(
        {
            400: "No `file` field, or a body that is not multipart/form-data.",
            404: RELEASE_NOT_FOUND,
            409: "The release already has its artifact (`code: artifact_exists`).",
            413: "The artifact is larger than the limit (`code: artifact_too_large`, `max_bytes`).",
            415: "The body is not multipart/form-data.",
        }
    ),
}


class ArtifactView(APIView):
    """The release's artifact: uploaded by operators, downloaded by operators and by the devices it is offered to."""

    parser_classes = [MultiPartParser]

    def get_permissions(self):
        if self.request is not None and self.request.method in ("GET", "HEAD", "OPTIONS"):
            return [IsOperatorOrDevice()]
        return super().get_permissions()

    def initialize_request(self, request, *args, **kwargs):
        # Before anything reads the body: the upload streams to a temporary file, hashed on the way.
        request.upload_handlers = [HashingUploadHandler(request, max_bytes=settings.FIRMWARE_ARTIFACT_MAX_BYTES)]
        return super().initialize_request(request, *args, **kwargs)

    @extend_schema(
        parameters=[VERSION],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The image; `ETag` and `X-Checksum-SHA256` carry its SHA-256."
            ),
            **error_responses(
                {
                    403: "A device may download only the release of the update it was offered.",
                    404: "No release with this version, or it has no artifact yet.",
                }
            ),
        },
        description="Download a release's artifact (operators; devices: the release they are being updated to).",
    )
    def get(self, request, version: str):
        release = _release(version)
        if is_device(request.user) and not selectors.device_may_download(
            device_id=request.user.device_id, version=version
        ):
            raise PermissionDenied("A device may download only the release of the update it was offered.")
        if not release.artifact_name:
            raise services.FirmwareArtifactMissing()
        response = FileResponse(
            selectors.artifact_open(release=release),
            as_attachment=True,
            filename=f"{release.version}.bin",
            content_type="application/octet-stream",
        )
        response["ETag"] = f'"{release.artifact_sha256}"'
        response["X-Checksum-SHA256"] = release.artifact_sha256
        return response

    @extend_schema(
        parameters=[VERSION],
        request={"multipart/form-data": ArtifactUploadSerializer},
        responses=ARTIFACT_UPLOAD_RESPONSES,
        description="Upload the release's artifact (multipart field `file`), once. The server computes its "
        "SHA-256 and size while it streams in; updates check them against the release's checksum.",
    )
    def put(self, request, version: str):
        _release(version)
        fields = _body(ArtifactUploadSerializer, request)
        release = services.firmware_artifact_attach(version=version, file=fields["file"])
        return Response(ReleaseSerializer(release).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        parameters=[VERSION],
        request={"multipart/form-data": ArtifactUploadSerializer},
        responses=ARTIFACT_UPLOAD_RESPONSES,
        description="The same as PUT.",
    )
    def post(self, request, version: str):
        return self.put(request, version)


# --- Updates -------------------------------------------------------------------------------------


def _update_response(update, *, code: int = status.HTTP_200_OK) -> Response:
    saga = selectors.update_saga(update=update)
    return Response(UpdateDetailSerializer(update, context={"saga": saga}).data, status=code)


class UpdateListCreateView(GenericAPIView):
    serializer_class = UpdateSerializer
    pagination_class = StartedOrderPagination

    @extend_schema(
        parameters=[UpdateListQuerySerializer],
        responses={200: UpdateSerializer(many=True), **error_responses({400: f"{BAD_QUERY} Or a bad cursor."})},
        description="Updates, newest first, a page at a time (`next` is an opaque cursor); "
        "filter by device, rollout, status, or active/finished.",
    )
    def get(self, request):
        query = _query(UpdateListQuerySerializer, request)
        active = query.get("active")
        updates = selectors.update_list(
            device_id=query.get("device_id"),
            rollout_id=query.get("rollout_id"),
            status=query.get("status"),
            active=None if active is None else active == "true",
        )
        page = self.paginate_queryset(updates)
        return self.get_paginated_response(UpdateSerializer(page, many=True).data)

    @extend_schema(
        request=UpdateCreateSerializer,
        responses={
            201: UpdateDetailSerializer,
            **error_responses(
                {
                    400: MALFORMED_BODY,
                    409: "The device has an active update (`code: update_active`, `active_update_id`); "
                    "send `force: true` to supersede it.",
                    415: UNSUPPORTED_MEDIA,
                    422: "No device with this `device_id` (or it is decommissioned), or no release `to_version`.",
                }
            ),
        },
        description="Update a device to a release. The update starts `pending` and runs as a durable saga: "
        "artifact verified, device in maintenance, update offered to the device, its report awaited; any "
        "failure rolls the completed steps back (the device keeps its status and firmware version).",
    )
    def post(self, request):
        fields = _body(UpdateCreateSerializer, request)
        window = fields.get("maintenance_window")
        update = services.firmware_update_start(
            device_id=fields["device_id"],
            to_version=fields["to_version"],
            force=fields["force"],
            maintenance_window=services.MaintenanceWindow(**window) if window else None,
            requested_by=request.user,
        )
        return _update_response(update, code=status.HTTP_201_CREATED)


class UpdateDetailView(APIView):
    permission_classes = [IsOperatorOrDevice]

    @extend_schema(
        parameters=[UPDATE_ID],
        responses={
            200: UpdateDetailSerializer,
            **error_responses({403: "A device may read only its own updates.", 404: UPDATE_NOT_FOUND}),
        },
        description="An update, with its saga's step log (devices: their own updates).",
    )
    def get(self, request, update_id: str):
        update = selectors.update_get(update_id=_parse_update_id(update_id))
        if update is None:
            raise NotFound(UPDATE_NOT_FOUND)
        if is_device(request.user) and update.device_id != request.user.device_id:
            raise PermissionDenied("A device may read only its own updates.")
        return _update_response(update)


class UpdateCancelView(APIView):
    @extend_schema(
        parameters=[UPDATE_ID],
        request=UpdateCancelSerializer,
        responses={
            200: UpdateDetailSerializer,
            **error_responses(
                {
                    400: MALFORMED_BODY,
                    404: UPDATE_NOT_FOUND,
                    409: "The update has finished, or failed and is being rolled back "
                    "(`code: invalid_transition`, `status`).",
                    415: UNSUPPORTED_MEDIA,
                }
            ),
        },
        description="Cancel an active update: its completed steps are rolled back and it ends `rolled_back`. "
        "The answer may still show it active (with `cancelled_at`) while the rollback runs.",
    )
    def post(self, request, update_id: str):
        parsed = _parse_update_id(update_id)
        fields = _body(UpdateCancelSerializer, request)
        reason = fields.get("reason") or "cancelled by an operator"
        update = services.firmware_update_cancel(update_id=parsed, reason=reason)
        return _update_response(update)


class UpdateReportView(APIView):
    permission_classes = [IsOperatorOrDevice]

    @extend_schema(
        parameters=[UPDATE_ID],
        request=UpdateReportSerializer,
        responses={
            200: UpdateSerializer,
            **error_responses(
                {
                    400: MALFORMED_BODY,
                    403: "Only the update's own device reports on it.",
                    404: UPDATE_NOT_FOUND,
                    409: "The update has finished (with another outcome), was cancelled or withdrawn, is not "
                    "dispatched yet, already has the other result, or (`code: outside_maintenance_window`) "
                    "installing is not allowed now.",
                    415: UNSUPPORTED_MEDIA,
                }
            ),
        },
        description="The device reports a stage (`downloading`, `downloaded`, `installing`, with `progress`) or "
        "its result (`installed` with `version`, `failed` with `reason`). Idempotent: a repeated or late report "
        "changes nothing and is answered 200 with the current state.",
    )
    def post(self, request, update_id: str):
        device_id = _device_only(request)
        parsed = _parse_update_id(update_id)
        fields = _body(UpdateReportSerializer, request)
        update = services.firmware_update_report(update_id=parsed, device_id=device_id, **fields)
        return Response(UpdateSerializer(update).data)


class DeviceUpdateView(APIView):
    permission_classes = [IsOperatorOrDevice]

    @extend_schema(
        responses={
            200: DeviceUpdateSerializer,
            204: OpenApiResponse(description="No update is waiting for this device."),
            **error_responses({403: "This endpoint is for devices."}),
        },
        description="For a device: the update waiting for it, if any. Download `artifact_url` (with the same "
        "credential), check its SHA-256, report progress; install only while `install_allowed`.",
    )
    def get(self, request):
        device_id = _device_only(request)
        update = selectors.device_pending_update(device_id=device_id)
        if update is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        url = request.build_absolute_uri(reverse("firmware-artifact", kwargs={"version": update.to_version}))
        return Response(DeviceUpdateSerializer(update, context={"artifact_url": url}).data)


# --- Rollouts ------------------------------------------------------------------------------------


def _rollout_response(rollout_id: uuid.UUID, *, code: int = status.HTTP_200_OK) -> Response:
    rollout = selectors.rollout_get(rollout_id=rollout_id)
    if rollout is None:
        raise NotFound(ROLLOUT_NOT_FOUND)
    progress = selectors.rollout_progress(rollout=rollout)
    return Response(RolloutSerializer(rollout, context={"progress": progress}).data, status=code)


def _parse_rollout_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound(ROLLOUT_NOT_FOUND) from exc


ROLLOUT_TRANSITION_ERRORS = {
    400: MALFORMED_BODY,
    404: ROLLOUT_NOT_FOUND,
    409: "The rollout's status does not allow it (`code: invalid_transition`, `status`).",
    415: UNSUPPORTED_MEDIA,
}


class RolloutListCreateView(GenericAPIView):
    serializer_class = RolloutSerializer
    pagination_class = CreatedOrderPagination

    @extend_schema(
        parameters=[RolloutListQuerySerializer],
        responses={200: RolloutSerializer(many=True), **error_responses({400: f"{BAD_QUERY} Or a bad cursor."})},
        description="Rollouts, newest first, a page at a time (`next` is an opaque cursor), each with its counts "
        "(`progress` without `per_stage`: read one rollout for that).",
    )
    def get(self, request):
        query = _query(RolloutListQuerySerializer, request)
        page = self.paginate_queryset(selectors.rollout_list(status=query.get("status")))
        return self.get_paginated_response(RolloutSerializer(page, many=True).data)

    @extend_schema(
        request=RolloutCreateSerializer,
        responses={
            201: RolloutSerializer,
            **error_responses(
                {
                    400: f"{MALFORMED_BODY} Or stages that are not increasing percentages ending with 100, or a "
                    "threshold outside 0..1 (under the field's name).",
                    415: UNSUPPORTED_MEDIA,
                    422: "No release `to_version`, or it has no artifact yet; or no device matches the target "
                    "(`code: no_targets`).",
                }
            ),
        },
        description="Start a staged rollout. The target devices are resolved now, once, and put in a fixed random "
        "order; stage k's updates are created when stage k-1 reached `success_threshold`. More than "
        "`error_threshold` of the finished updates failed (once `error_min_finished` have finished): the rollout "
        "stops and its updates in flight are rolled back. A device with another active update when its stage "
        "comes is skipped (`counts.skipped`), never forced.",
    )
    def post(self, request):
        fields = _body(RolloutCreateSerializer, request)
        window = fields.pop("maintenance_window", None)
        rollout = rollouts.firmware_rollout_start(
            **fields,
            maintenance_window=services.MaintenanceWindow(**window) if window else None,
            requested_by=request.user,
        )
        return _rollout_response(rollout.pk, code=status.HTTP_201_CREATED)


class RolloutDetailView(APIView):
    @extend_schema(
        parameters=[ROLLOUT_ID],
        responses={200: RolloutSerializer, **error_responses({404: ROLLOUT_NOT_FOUND})},
        description="A rollout with its progress: targets by status overall and per stage, success and failure rates.",
    )
    def get(self, request, rollout_id: str):
        return _rollout_response(_parse_rollout_id(rollout_id))


class RolloutPauseView(APIView):
    @extend_schema(
        parameters=[ROLLOUT_ID],
        request=RolloutEmptySerializer,
        responses={200: RolloutSerializer, **error_responses(ROLLOUT_TRANSITION_ERRORS)},
        description="Pause a running rollout: no new update is created; those in flight go on (and may still "
        "trip the error threshold). Pausing a paused rollout changes nothing.",
    )
    def post(self, request, rollout_id: str):
        parsed = _parse_rollout_id(rollout_id)
        _body(RolloutEmptySerializer, request)
        rollouts.firmware_rollout_pause(rollout_id=parsed)
        return _rollout_response(parsed)


class RolloutResumeView(APIView):
    @extend_schema(
        parameters=[ROLLOUT_ID],
        request=RolloutEmptySerializer,
        responses={200: RolloutSerializer, **error_responses(ROLLOUT_TRANSITION_ERRORS)},
        description="Resume a paused rollout where it stopped. Resuming a running rollout changes nothing.",
    )
    def post(self, request, rollout_id: str):
        parsed = _parse_rollout_id(rollout_id)
        _body(RolloutEmptySerializer, request)
        rollouts.firmware_rollout_resume(rollout_id=parsed)
        return _rollout_response(parsed)


class RolloutCancelView(APIView):
    @extend_schema(
        parameters=[ROLLOUT_ID],
        request=RolloutCancelSerializer,
        responses={200: RolloutSerializer, **error_responses(ROLLOUT_TRANSITION_ERRORS)},
        description="Cancel a running or paused rollout: no new update, and every update in flight is cancelled "
        "and rolled back (the answer may still count them in flight while that runs). Cancelling a cancelled "
        "rollout changes nothing; a completed or stopped one is 409.",
    )
    def post(self, request, rollout_id: str):
        parsed = _parse_rollout_id(rollout_id)
        fields = _body(RolloutCancelSerializer, request)
        rollouts.firmware_rollout_cancel(
            rollout_id=parsed, reason=fields.get("reason") or f"cancelled by {request.user}"
        )
        return _rollout_response(parsed)
