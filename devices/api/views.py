import uuid

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from devices import selectors, services
from devices.api.serializers import (
    DeviceListQuerySerializer,
    DeviceRegisterSerializer,
    DeviceRegistrationResponseSerializer,
    DeviceSerializer,
    DeviceUpdateSerializer,
)
from iot.api.pagination import LimitCursorPagination
from iot.api.schema import BAD_QUERY, MALFORMED_BODY, UNSUPPORTED_MEDIA, error_responses
from iot.idempotency.http import HEADER as IDEMPOTENCY_HEADER
from iot.idempotency.http import idempotent_response


def parse_device_id(raw: str) -> uuid.UUID:
    """A path id that is not a UUID names no device: 404, like an unknown one."""
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound("No device with this id.") from exc


NOT_FOUND = "No device with this id (a malformed id names none either)."
DEVICE_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The device's id.")

IDEMPOTENCY_PARAMETER = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    {"type": "string", "minLength": 1, "maxLength": settings.IDEMPOTENCY_KEY_MAX_LENGTH},
    OpenApiParameter.HEADER,
    required=False,
    description="Makes a retry safe: the same key and body register once and replay the first answer "
    "(`Idempotent-Replayed: true`). Printable characters only.",
)


@extend_schema_view(
    list=extend_schema(
        parameters=[DeviceListQuerySerializer],
        responses={
            200: DeviceSerializer(many=True),
            **error_responses({400: f"{BAD_QUERY} Or a cursor we did not make."}),
        },
        description="Devices, newest registration first, a page at a time: follow `next` (an opaque cursor).",
    ),
    retrieve=extend_schema(
        parameters=[DEVICE_ID], responses={200: DeviceSerializer, **error_responses({404: NOT_FOUND})}
    ),
)
class DeviceViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = DeviceSerializer
    pagination_class = LimitCursorPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        query = DeviceListQuerySerializer(data=self.request.query_params.dict())
        query.is_valid(raise_exception=True)
        filters = {name: query.validated_data.get(name) for name in ("serial_number", "group_id", "status")}
        return selectors.device_list(**filters)

    @extend_schema(
        request=DeviceRegisterSerializer,
        responses={
            201: DeviceRegistrationResponseSerializer,
            200: OpenApiResponse(DeviceSerializer, description="The serial number was registered before."),
            **error_responses(
                {
                    400: f"{MALFORMED_BODY} Or a malformed Idempotency-Key.",
                    409: "A request with the same Idempotency-Key is still being processed; retry.",
                    415: UNSUPPORTED_MEDIA,
                    422: "The Idempotency-Key was used before with a different body.",
                }
            ),
        },
        parameters=[IDEMPOTENCY_PARAMETER],
        description="Register a device; an already registered serial number returns the existing device (200).",
    )
    def create(self, request):
        serializer = DeviceRegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)

        def register():
            registration = services.device_register(**serializer.validated_data)
            if registration.created:
                body = DeviceRegistrationResponseSerializer(registration.device).data
                body["device_token"] = registration.device_token
                return status.HTTP_201_CREATED, body
            return status.HTTP_200_OK, DeviceSerializer(registration.device).data

        return idempotent_response(request, register)

    def retrieve(self, request, pk=None):
        device = selectors.device_get(device_id=parse_device_id(pk))
        if device is None:
            raise NotFound("No device with this id.")
        return self._respond(device)

    @extend_schema(
        parameters=[DEVICE_ID],
        request=DeviceUpdateSerializer,
        responses={
            200: DeviceSerializer,
            **error_responses({400: f"{MALFORMED_BODY} An empty body too.", 404: NOT_FOUND, 415: UNSUPPORTED_MEDIA}),
        },
        description="Change some of a device's fields (at least one).",
    )
    def partial_update(self, request, pk=None):
        device_id = parse_device_id(pk)
        serializer = DeviceUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        # An unknown id raises `DeviceNotFound`, a 404 by `api_exception_handler`.
        device = services.device_update(device_id=device_id, changes=serializer.validated_data)
        return self._respond(device)

    def _respond(self, device):
        return Response(DeviceSerializer(device).data)
