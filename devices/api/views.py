import uuid

from drf_spectacular.utils import OpenApiParameter, extend_schema
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
from devices.models import Device
from iot.api.pagination import LimitCursorPagination
from iot.idempotency.http import HEADER as IDEMPOTENCY_HEADER
from iot.idempotency.http import idempotent_response


def parse_device_id(raw: str) -> uuid.UUID:
    """A path id that is not a UUID names no device: 404, like an unknown one."""
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound("No device with this id.") from exc


class DeviceViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = DeviceSerializer
    pagination_class = LimitCursorPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        query = DeviceListQuerySerializer(data=self.request.query_params.dict())
        query.is_valid(raise_exception=True)
        return selectors.device_list(
            group_id=query.validated_data.get("group_id"), status=query.validated_data.get("status")
        )

    @extend_schema(
        request=DeviceRegisterSerializer,
        responses={201: DeviceRegistrationResponseSerializer, 200: DeviceSerializer},
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)],
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

    @extend_schema(request=DeviceUpdateSerializer, responses=DeviceSerializer)
    def partial_update(self, request, pk=None):
        device_id = parse_device_id(pk)
        serializer = DeviceUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            device = services.device_update(device_id=device_id, changes=serializer.validated_data)
        except Device.DoesNotExist as exc:
            raise NotFound("No device with this id.") from exc
        return self._respond(device)

    def _respond(self, device):
        return Response(DeviceSerializer(device).data)
