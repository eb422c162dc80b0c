import binascii
from base64 import b64decode
from datetime import UTC, datetime
from urllib.parse import parse_qs

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import Cursor, CursorPagination

INVALID_CURSOR = "Invalid cursor: pass back the `next` or `previous` link of a page unchanged."


class LimitCursorPagination(CursorPagination):
    """Opaque-cursor pages (`?limit=&cursor=`): stable under concurrent inserts.

    A cursor is ours only if it decodes exactly as we encode it; anything else is
    a 400 naming `cursor`. DRF's own decoding answers 404 for some bad cursors,
    ignores non-base64 characters (`%%%` read as the first page) and hands the
    position to the ORM unchecked (`p=not-a-date` was a `ValidationError` deep in
    the query: a 500).
    """

    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 1000
    ordering = ("-registered_at", "-id")
    invalid_cursor_message = INVALID_CURSOR

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

    def decode_cursor(self, request):
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded is None:
            return None
        try:
            tokens = parse_qs(
                b64decode(encoded.encode("ascii"), validate=True).decode("ascii"),
                keep_blank_values=True,
                strict_parsing=True,
                max_num_fields=3,
            )
            if set(tokens) - {"o", "r", "p"} or any(len(values) != 1 for values in tokens.values()):
                raise ValueError("unknown or repeated token")
            offset = int(tokens.get("o", ["0"])[0])
            reverse = tokens.get("r", ["0"])[0]
            position = tokens.get("p", [None])[0]
            if not 0 <= offset <= self.offset_cutoff or reverse not in ("0", "1"):
                raise ValueError("offset or direction out of range")
            if position is not None:
                if "\x00" in position:  # fromisoformat ignores one trailing NUL
                    raise ValueError("NUL in position")
                # The first ordering field is a timestamp: normalised to UTC (OverflowError past year 9999).
                moment = datetime.fromisoformat(position)
                position = (moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()
        except (ValueError, OverflowError, binascii.Error) as exc:
            raise ValidationError({self.cursor_query_param: [self.invalid_cursor_message]}) from exc
        return Cursor(offset=offset, reverse=reverse == "1", position=position)
