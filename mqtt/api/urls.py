from django.urls import path

from mqtt.api.views import MqttAclView, MqttAuthView

urlpatterns = [
    path("mqtt/auth", MqttAuthView.as_view(), name="mqtt-auth"),
    path("mqtt/acl", MqttAclView.as_view(), name="mqtt-acl"),
]
