"""A JSON parser for the ingestion endpoints, on orjson.

orjson parses a 100-point batch ~5x faster than the standard library and is
strict JSON: `NaN`, `Infinity` and numbers that overflow a double (`1e400`) are
parse errors (400), not floats that would need catching later.
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
