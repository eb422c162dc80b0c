from rest_framework.routers import SimpleRouter

from alerts.api.views import AlertRuleViewSet, AlertViewSet, NotificationChannelViewSet, SilenceViewSet

router = SimpleRouter(trailing_slash=False)
# `alerts/<id>` only matches a UUID-like id (AlertViewSet.lookup_value_regex), so the sub-collections
# (and the channels the notifications part adds here) never resolve as an alert.
router.register("alerts/rules", AlertRuleViewSet, basename="alert-rule")
router.register("alerts/channels", NotificationChannelViewSet, basename="alert-channel")
router.register("alerts/silences", SilenceViewSet, basename="alert-silence")
router.register("alerts", AlertViewSet, basename="alert")

urlpatterns = router.urls
