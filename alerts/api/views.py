"""Alerts HTTP API: rules, alerts (list, read, acknowledge, resolve) and silences; operators only.

Status codes: `400` bad input (an unknown field, a bad value, both or neither of
`device_id` / `group_id`; nothing stored); `404` unknown id (a malformed one
names nothing either); `409` a transition the alert's status does not allow
(acknowledging an alert that is not open, resolving a resolved one); `422` a
well-formed reference to something that does not exist (a rule or silence for an
unknown device, an unknown channel or rule), as telemetry answers for an unknown
device.
"""

import uuid

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from alerts import selectors, services
from alerts.api.serializers import (
    AlertListQuerySerializer,
    AlertRuleCreateSerializer,
    AlertRuleListQuerySerializer,
    AlertRuleSerializer,
    AlertRuleUpdateSerializer,
    AlertSerializer,
    ChannelListQuerySerializer,
    EmptyBodySerializer,
    NotificationChannelCreateSerializer,
    NotificationChannelSerializer,
    SilenceCreateSerializer,
    SilenceListQuerySerializer,
    SilenceSerializer,
)
from iot.api.pagination import LimitCursorPagination
from iot.api.schema import BAD_QUERY, MALFORMED_BODY, UNSUPPORTED_MEDIA, error_responses
from iot.circuit_breaker import breaker_states


class CreatedOrderPagination(LimitCursorPagination):
    """Newest first (by when the platform created the row), a page at a time."""

    ordering = ("-created_at", "-id")


def _parse_id(raw: str, what: str) -> uuid.UUID:
    """A path id that is not a UUID names nothing: 404, like an unknown one."""
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound(f"No {what} with this id.") from exc


def _query(serializer_class, request) -> dict:
    query = serializer_class(data=request.query_params.dict())
    query.is_valid(raise_exception=True)
    return query.validated_data


def _body(serializer_class, request) -> dict:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _id_parameter(what: str) -> OpenApiParameter:
    return OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description=f"The {what}'s id.")


LIST_REFUSALS = error_responses({400: f"{BAD_QUERY} Or a cursor we did not make."})


# --- Rules ---------------------------------------------------------------------------------------

RULE_ID = _id_parameter("rule")
RULE_NOT_FOUND = "No rule with this id (a malformed id names none either)."


@extend_schema_view(
    list=extend_schema(
        parameters=[AlertRuleListQuerySerializer],
        responses={200: AlertRuleSerializer(many=True), **LIST_REFUSALS},
        description="Alert rules, newest first, a page at a time: follow `next` (an opaque cursor).",
    ),
    retrieve=extend_schema(
        parameters=[RULE_ID], responses={200: AlertRuleSerializer, **error_responses({404: RULE_NOT_FOUND})}
    ),
)
class AlertRuleViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = AlertRuleSerializer
    pagination_class = CreatedOrderPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        query = _query(AlertRuleListQuerySerializer, self.request)
        enabled = query.get("enabled")
        return selectors.alert_rule_list(
            device_id=query.get("device_id"),
            group_id=query.get("group_id"),
            enabled=None if enabled is None else enabled == "true",
        )

    @extend_schema(
        request=AlertRuleCreateSerializer,
        responses={
            201: AlertRuleSerializer,
            **error_responses(
                {
                    400: f"{MALFORMED_BODY} Or both or neither of device_id and group_id.",
                    415: UNSUPPORTED_MEDIA,
                    422: "No device with this device_id, or no channel with one of channel_ids.",
                }
            ),
        },
        description="Create a rule on a device or on a group; it applies from the next point ingested.",
    )
    def create(self, request):
        fields = _body(AlertRuleCreateSerializer, request)
        rule = services.alert_rule_create(**fields)
        return Response(AlertRuleSerializer(selectors.alert_rule_get(rule_id=rule.pk)).data, status=201)

    def retrieve(self, request, pk=None):
        rule = selectors.alert_rule_get(rule_id=_parse_id(pk, "rule"))
        if rule is None:
            raise NotFound(RULE_NOT_FOUND)
        return Response(AlertRuleSerializer(rule).data)

    @extend_schema(
        parameters=[RULE_ID],
        request=AlertRuleUpdateSerializer,
        responses={
            200: AlertRuleSerializer,
            **error_responses(
                {
                    400: f"{MALFORMED_BODY} An empty body, or device_id / group_id, too.",
                    404: RULE_NOT_FOUND,
                    415: UNSUPPORTED_MEDIA,
                    422: "No channel with one of channel_ids.",
                }
            ),
        },
        description="Change some of a rule's fields (at least one); the next point ingested is evaluated with them.",
    )
    def partial_update(self, request, pk=None):
        rule_id = _parse_id(pk, "rule")
        changes = _body(AlertRuleUpdateSerializer, request)
        rule = services.alert_rule_update(rule_id=rule_id, changes=changes)
        return Response(AlertRuleSerializer(rule).data)

    @extend_schema(
        parameters=[RULE_ID],
        responses={204: None, **error_responses({404: RULE_NOT_FOUND})},
        description="Delete a rule with its alerts and silences. To stop it but keep its alerts, "
        "set `enabled` to false instead.",
    )
    def destroy(self, request, pk=None):
        services.alert_rule_delete(rule_id=_parse_id(pk, "rule"))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Silences ------------------------------------------------------------------------------------

SILENCE_ID = _id_parameter("silence")
SILENCE_NOT_FOUND = "No silence with this id (a malformed id names none either)."


@extend_schema_view(
    list=extend_schema(
        parameters=[SilenceListQuerySerializer],
        responses={200: SilenceSerializer(many=True), **LIST_REFUSALS},
        description="Silences, newest first, a page at a time.",
    ),
    retrieve=extend_schema(
        parameters=[SILENCE_ID], responses={200: SilenceSerializer, **error_responses({404: SILENCE_NOT_FOUND})}
    ),
)
class SilenceViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = SilenceSerializer
    pagination_class = CreatedOrderPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        state = _query(SilenceListQuerySerializer, self.request).get("state")
        return selectors.silence_list(active=None if state is None else state == "active")

    @extend_schema(
        request=SilenceCreateSerializer,
        responses={
            201: SilenceSerializer,
            **error_responses(
                {
                    400: f"{MALFORMED_BODY} Or not exactly one of rule_id, device_id and group_id, "
                    "or an ends_at not after starts_at.",
                    415: UNSUPPORTED_MEDIA,
                    422: "No rule with this rule_id, or no device with this device_id.",
                }
            ),
        },
        description="Mute notifications for a rule, a device or a group until `ends_at`. "
        "Alerts are still recorded and counted.",
    )
    def create(self, request):
        fields = _body(SilenceCreateSerializer, request)
        silence = services.silence_create(**fields, created_by=request.user)
        return Response(SilenceSerializer(silence).data, status=201)

    def retrieve(self, request, pk=None):
        silence = selectors.silence_get(silence_id=_parse_id(pk, "silence"))
        if silence is None:
            raise NotFound(SILENCE_NOT_FOUND)
        return Response(SilenceSerializer(silence).data)

    @extend_schema(
        parameters=[SILENCE_ID],
        responses={200: SilenceSerializer, **error_responses({404: SILENCE_NOT_FOUND})},
        description="Expire the silence now (it stays listed, `expired`); expiring it again changes nothing.",
    )
    def destroy(self, request, pk=None):
        silence = services.silence_expire(silence_id=_parse_id(pk, "silence"))
        return Response(SilenceSerializer(silence).data)


# --- Alerts --------------------------------------------------------------------------------------

ALERT_ID = _id_parameter("alert")
ALERT_NOT_FOUND = "No alert with this id."
TRANSITION_REFUSALS = {
    400: "A body with fields (none are accepted).",
    404: ALERT_NOT_FOUND,
    409: "The alert's status does not allow this (`code: invalid_transition`, `status`: the current one).",
}


@extend_schema_view(
    list=extend_schema(
        parameters=[AlertListQuerySerializer],
        responses={200: AlertSerializer(many=True), **LIST_REFUSALS},
        description="Alerts, newest first, a page at a time: follow `next` (an opaque cursor).",
    ),
    retrieve=extend_schema(
        parameters=[ALERT_ID], responses={200: AlertSerializer, **error_responses({404: ALERT_NOT_FOUND})}
    ),
)
class AlertViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = AlertSerializer
    pagination_class = CreatedOrderPagination
    # Ids are UUIDs: `/alerts/rules`, `/alerts/silences` (and any later `/alerts/<word>`) never
    # resolve as an alert, whatever the order the routes are registered in.
    lookup_value_regex = "[0-9A-Fa-f-]{1,64}"

    def get_queryset(self):
        query = _query(AlertListQuerySerializer, self.request)
        filters = ("device_id", "status", "rule_id", "severity")
        return selectors.alert_list(**{name: query.get(name) for name in filters})

    def retrieve(self, request, pk=None):
        alert = selectors.alert_get(alert_id=_parse_id(pk, "alert"))
        if alert is None:
            raise NotFound(ALERT_NOT_FOUND)
        return Response(AlertSerializer(alert).data)

    @extend_schema(
        parameters=[ALERT_ID],
        request=EmptyBodySerializer,
        responses={200: AlertSerializer, **error_responses(TRANSITION_REFUSALS)},
        description="open -> acknowledged: someone is on it. Further violations still count into it.",
    )
    @action(detail=True, methods=["post"])
    def acknowledge(self, request, pk=None):
        alert_id = _parse_id(pk, "alert")
        _body(EmptyBodySerializer, request)
        alert = services.alert_acknowledge(alert_id=alert_id, by=request.user)
        return Response(AlertSerializer(alert).data)

    @extend_schema(
        parameters=[ALERT_ID],
        request=EmptyBodySerializer,
        responses={200: AlertSerializer, **error_responses(TRANSITION_REFUSALS)},
        description="open or acknowledged -> resolved. The next violation of its rule on its device opens a new alert.",
    )
    @action(detail=True, methods=["post"])
    def resolve(self, request, pk=None):
        alert_id = _parse_id(pk, "alert")
        _body(EmptyBodySerializer, request)
        alert = services.alert_resolve(alert_id=alert_id, by=request.user)
        return Response(AlertSerializer(alert).data)


# --- Notification channels -----------------------------------------------------------------------

CHANNEL_ID = _id_parameter("channel")
CHANNEL_NOT_FOUND = "No notification channel with this id."


def _channels_data(channels) -> list[dict] | dict:
    """Serialize channels with their breakers' states, read in one Redis round trip whatever their number."""
    many = isinstance(channels, list)
    listed = channels if many else [channels]
    states = breaker_states(names=[services.channel_breaker_name(channel.pk) for channel in listed])
    data = NotificationChannelSerializer(listed, many=True, context={"breaker_states": states}).data
    return data if many else data[0]


@extend_schema_view(
    list=extend_schema(
        parameters=[ChannelListQuerySerializer],
        responses={200: NotificationChannelSerializer(many=True), **LIST_REFUSALS},
        description="Notification channels, newest first, each with its circuit breaker's state.",
    ),
    retrieve=extend_schema(
        parameters=[CHANNEL_ID],
        responses={200: NotificationChannelSerializer, **error_responses({404: CHANNEL_NOT_FOUND})},
    ),
    destroy=extend_schema(
        parameters=[CHANNEL_ID],
        responses={204: None, **error_responses({404: CHANNEL_NOT_FOUND})},
        description="Delete the channel, its links to rules and its undelivered notifications; forget its breaker.",
    ),
)
class NotificationChannelViewSet(viewsets.GenericViewSet):
    serializer_class = NotificationChannelSerializer
    pagination_class = CreatedOrderPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        return selectors.notification_channel_list()

    def list(self, request):
        _query(ChannelListQuerySerializer, request)
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(_channels_data(list(page)))

    @extend_schema(
        request=NotificationChannelCreateSerializer,
        responses={
            201: NotificationChannelSerializer,
            **error_responses(
                {
                    400: f"{MALFORMED_BODY} Or a URL the SSRF guard refuses (not http(s), credentials in it, "
                    "a host that does not resolve or resolves to a loopback, private or link-local address).",
                    415: UNSUPPORTED_MEDIA,
                }
            ),
        },
        description="Create a webhook channel. Its URL is checked now and again at every delivery.",
    )
    def create(self, request):
        fields = _body(NotificationChannelCreateSerializer, request)
        channel = services.notification_channel_create(**fields)
        return Response(_channels_data(channel), status=201)

    def retrieve(self, request, pk=None):
        channel = selectors.notification_channel_get(channel_id=_parse_id(pk, "notification channel"))
        if channel is None:
            raise NotFound(CHANNEL_NOT_FOUND)
        return Response(_channels_data(channel))

    def destroy(self, request, pk=None):
        services.notification_channel_delete(channel_id=_parse_id(pk, "notification channel"))
        return Response(status=status.HTTP_204_NO_CONTENT)
