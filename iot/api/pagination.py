from rest_framework.exceptions import ValidationError
from rest_framework.pagination import CursorPagination


class LimitCursorPagination(CursorPagination):
    """Opaque-cursor pages (`?limit=&cursor=`): stable under concurrent inserts."""

    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 1000
    ordering = ("-registered_at", "-id")

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if not 1 <= value <= self.max_page_size:
            raise ValidationError({"limit": [f"Must be an integer from 1 to {self.max_page_size}."]})
        return value
