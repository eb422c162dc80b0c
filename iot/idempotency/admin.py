from django.contrib import admin

from iot.idempotency.models import IdempotencyKey


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(admin.ModelAdmin):
    """Which keys exist and what status they answered; never what they answered.

    A stored response may carry a secret shown to its client once (a registration's
    device credential), so the body (encrypted or not) and the request's fingerprint
    are not shown to anyone, whatever their permissions.
    """

    list_display = ("key", "scope", "response_status", "created_at", "expires_at")
    fields = list_display
    readonly_fields = list_display
    search_fields = ("key", "scope")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
