"""Analytics HTTP API: the fleet, a group, a device; operators only. Each costs a constant number of
queries and Redis round trips, whatever the fleet's size (`analytics.selectors`)."""

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from analytics import selectors
from analytics.api.serializers import DeviceAnalyticsSerializer, FleetAnalyticsSerializer, GroupAnalyticsSerializer
from iot.api.schema import error_responses

DEVICE_NOT_FOUND = "No device with this id."


class FleetAnalyticsView(APIView):
    @extend_schema(responses={200: FleetAnalyticsSerializer, **error_responses({})})
    def get(self, request):
        return Response(FleetAnalyticsSerializer(selectors.fleet_analytics()).data)


class GroupAnalyticsView(APIView):
    @extend_schema(responses={200: GroupAnalyticsSerializer, **error_responses({})})
    def get(self, request, group_id: str):
        return Response(GroupAnalyticsSerializer(selectors.group_analytics(group_id=group_id)).data)


class DeviceAnalyticsView(APIView):
    @extend_schema(responses={200: DeviceAnalyticsSerializer, **error_responses({404: DEVICE_NOT_FOUND})})
    def get(self, request, device_id: str):
        try:
            parsed = uuid.UUID(device_id)
        except ValueError:
            raise NotFound(DEVICE_NOT_FOUND) from None
        analytics = selectors.device_analytics(device_id=parsed)
        if analytics is None:
            raise NotFound(DEVICE_NOT_FOUND)
        return Response(DeviceAnalyticsSerializer(analytics).data)
