"""The bodies the broker sends: EMQX 5's HTTP authentication and authorization requests (docs/MQTT.md).

Lenient about extra fields (unlike the public API's strict serializers): an operator who adds
`${peerhost}` or `${qos}` to EMQX's body template must not turn every answer into a 400.
"""

from rest_framework import serializers

from mqtt.services import ACTIONS

# MQTT strings are at most 65 535 bytes (3.1.1 §1.5.3); anything longer did not come from a broker.
_MQTT_STRING = {"allow_blank": True, "trim_whitespace": False, "max_length": 65535}


class MqttAuthRequestSerializer(serializers.Serializer):
    username = serializers.CharField(**_MQTT_STRING)
    password = serializers.CharField(**_MQTT_STRING)
    clientid = serializers.CharField(**_MQTT_STRING)


class MqttAclRequestSerializer(serializers.Serializer):
    username = serializers.CharField(**_MQTT_STRING)
    clientid = serializers.CharField(**_MQTT_STRING)
    topic = serializers.CharField(allow_blank=False, trim_whitespace=False, max_length=65535)
    action = serializers.ChoiceField(choices=ACTIONS)
