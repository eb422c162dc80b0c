import uuid
from functools import cached_property

from django.contrib import admin, messages
from django.core.paginator import Paginator

from telemetry.models import TelemetryPoint


class CappedCountPaginator(Paginator):
    """Counts at most `CAP` rows (`SELECT count(*) FROM (... LIMIT CAP)`), never a whole device's history."""

    CAP = 10_000

    @cached_property
    def count(self) -> int:
        return self.object_list[: self.CAP].count()


@admin.register(TelemetryPoint)
class TelemetryPointAdmin(admin.ModelAdmin):
    """Read-only recent points of one device (search: `<device id>` or `<device id> <metric>`).

    The table is large and partitioned, so the list only ever shows one device's
    newest points, read through the (device_id, metric, ts DESC) index: no
    unfiltered listing, no COUNT(*) (capped paginator), no sorting by other
    columns, no detail pages (points are not looked up by id).
    """

    list_display = ("ts", "metric", "value", "device_id", "received_at")
    list_display_links = None
    sortable_by = ()
    search_fields = ("device_id",)  # the search itself is get_search_results below
    search_help_text = "Enter a device id (UUID), optionally followed by a metric name."
    list_per_page = 100
    show_full_result_count = False
    paginator = CappedCountPaginator

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        if not request.GET.get("q"):
            self.message_user(request, "Search for a device id to see its recent points.", messages.INFO)
        return super().changelist_view(request, extra_context)

    def get_search_results(self, request, queryset, search_term):
        parts = search_term.split()
        try:
            device_id = uuid.UUID(parts[0]) if parts else None
        except ValueError:
            device_id = None
        if device_id is None:
            return queryset.none(), False
        queryset = queryset.filter(device_id=device_id)
        if len(parts) > 1:
            queryset = queryset.filter(metric=parts[1])
        return queryset, False
