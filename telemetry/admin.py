import uuid
from functools import cached_property

from django.contrib import admin, messages
from django.core.paginator import Paginator

from devices.selectors import device_list, device_serial_numbers
from telemetry.models import TelemetryPoint


class CappedCountPaginator(Paginator):
    """Counts at most `CAP` rows (`SELECT count(*) FROM (... LIMIT CAP)`), never a whole device's history."""

    CAP = 10_000

    @cached_property
    def count(self) -> int:
        return self.object_list[: self.CAP].count()


def _timestamp(value) -> str:
    # Points often arrive several a second: the admin's default format (to the minute) made them look equal.
    return value.isoformat(sep=" ", timespec="milliseconds") if value is not None else "-"


@admin.register(TelemetryPoint)
class TelemetryPointAdmin(admin.ModelAdmin):
    """Read-only recent points of one device (search: its serial number or id, optionally followed by a metric).

    The table is large and partitioned, so the list only ever shows one device's
    newest points, read through the (device_id, metric, ts DESC) index: no
    unfiltered listing, no COUNT(*) (capped paginator), no sorting by other
    columns, no detail pages (points are not looked up by id).
    """

    list_display = ("measured_at", "metric", "value", "device", "stored_at")
    list_display_links = None
    sortable_by = ()
    search_fields = ("device_id",)  # the search itself is get_search_results below
    search_help_text = "A device's serial number or id (UUID), optionally followed by a metric name."
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
        if not request.GET.get("q", "").strip():
            self.message_user(
                request, "Search for a device's serial number or id to see its recent points.", messages.INFO
            )
        return super().changelist_view(request, extra_context)

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        # One query for the page's serial numbers (the points carry only the device id).
        serials = device_serial_numbers(device_ids={point.device_id for point in changelist.result_list})
        for point in changelist.result_list:
            point.serial_number = serials.get(point.device_id)
        return changelist

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset.none(), False
        device_id, metric = self._search_device(term)
        if device_id is None:
            self.message_user(
                request,
                f"No device with the serial number or id {term!r} (a serial number must match exactly).",
                messages.WARNING,
            )
            return queryset.none(), False
        queryset = queryset.filter(device_id=device_id)
        if metric is not None:
            queryset = queryset.filter(metric=metric)
        return queryset, False

    @staticmethod
    def _search_device(term: str) -> tuple[uuid.UUID | None, str | None]:
        """(device id, metric or None) for `<serial or id>` or `<serial or id> <metric>`.

        A serial number may contain spaces, so the whole term is tried as one before its
        last word is taken for a metric.
        """
        candidates = [(term, None)]
        if len(term.split()) > 1:
            device, metric = term.rsplit(maxsplit=1)
            candidates.append((device, metric))
        for device, metric in candidates:
            try:
                return uuid.UUID(device), metric
            except ValueError:
                pass
            device_id = device_list(serial_number=device).values_list("id", flat=True).first()
            if device_id is not None:
                return device_id, metric
        return None, None

    @admin.display(description="measured at (UTC)")
    def measured_at(self, point):
        return _timestamp(point.ts)

    @admin.display(description="stored at (UTC)")
    def stored_at(self, point):
        return _timestamp(point.received_at)

    @admin.display(description="device")
    def device(self, point):
        return getattr(point, "serial_number", None) or point.device_id
