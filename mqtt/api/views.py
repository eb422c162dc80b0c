"""`POST /mqtt/auth` and `POST /mqtt/acl`: the broker asks, in EMQX 5's HTTP authn/authz shapes.

Always `200 {"result": "allow"|"deny", "is_superuser": bool}` for a well-formed question (a refusal is
an answer, not an error); `400` for a body that is not one (malformed JSON, a missing field, an
unknown action); `401` without the broker's secret. Not in the public API schema: users never call them.
"""

from drf_spectacular.utils import extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from mqtt.api.serializers import MqttAclRequestSerializer, MqttAuthRequestSerializer
from mqtt.authentication import BrokerSecretAuthentication, IsBroker
from mqtt.services import MqttDecision, mqtt_client_authenticate, mqtt_topic_authorize


def _answer(decision: MqttDecision) -> Response:
    return Response({"result": decision.result, "is_superuser": decision.is_superuser})


class _BrokerView(APIView):
    authentication_classes = [BrokerSecretAuthentication]
    permission_classes = [IsBroker]


@extend_schema(exclude=True)
class MqttAuthView(_BrokerView):
    def post(self, request):
        serializer = MqttAuthRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return _answer(mqtt_client_authenticate(**serializer.validated_data))


@extend_schema(exclude=True)
class MqttAclView(_BrokerView):
    def post(self, request):
        serializer = MqttAclRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return _answer(mqtt_topic_authorize(**serializer.validated_data))
