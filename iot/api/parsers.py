"""The one JSON parser of every endpoint, on orjson.

Why not DRF's `JSONParser` (the standard library's `json`): it recurses once per
nesting level, so a body nested ~1 000 levels deep (`[[[[...]]]]`, 2 kB) raised
`RecursionError` inside the parser: a 500. orjson refuses anything nested deeper
than 1 024 levels as a parse error, and is strict JSON where the standard library
is lenient in ways Postgres is not:

* `NaN`, `Infinity` and numbers that overflow a double (`1e400`) are parse
  errors, not floats that would need catching later;
* a lone UTF-16 surrogate (`"\\udc00"`, or its raw UTF-8 bytes) is a parse error:
  such a string cannot be encoded as UTF-8, so Postgres could never store it;
* the body must be UTF-8 (RFC 8259), without a byte order mark.

It is also ~5x faster than the standard library on a 100-point telemetry batch.
One difference to know: an integer beyond 64 bits becomes the nearest double
(orjson has no arbitrary-precision integers), as JavaScript clients read it anyway.

`"\\u0000"` (NUL) is valid JSON and parses; the fields that store strings refuse
it (DRF's `CharField` and `iot.api.serializers.JSONObjectField`).
"""

import orjson
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser


class StrictJSONParser(BaseParser):
    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return orjson.loads(stream.read())
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        except RecursionError as exc:  # orjson stops at depth 1 024 itself; kept so no version of it can 500
            raise ParseError("JSON parse error - nested too deeply.") from exc
