"""Serializer building blocks shared by every app's API."""

import json
import math
import re

import orjson
from rest_framework import serializers

# How deep a JSON object field may nest (the object itself is level 1). Metadata is
# labels, not documents; the bound also keeps every later pass over the value (the
# size check, Postgres' jsonb input, rendering) far from any recursion limit.
JSON_OBJECT_MAX_DEPTH = 32

# What Postgres cannot store in text or jsonb: NUL ("\u0000" is valid JSON, refused by
# jsonb) and lone UTF-16 surrogates (no UTF-8 encoding exists; refused by orjson when
# parsing, but a field must not rely on the parser).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# Postgres keeps a jsonb number exactly and hands an integral one back as an integer: 1e20
# comes back as 100000000000000000000, which orjson (the device cache, the renderers) cannot
# serialize, so every later read of the row failed. Numbers are bounded to what round-trips.
JSON_NUMBER_MAX = 2**63 - 1


class StrictInputSerializer(serializers.Serializer):
    """An input serializer that refuses fields it does not know (typos fail loudly).

    The OpenAPI schema says so (`additionalProperties: false`, see `iot.api.schema`).
    """

    # At least this many fields must be sent (a subclass's validate() enforces it; the schema's minProperties).
    min_fields = 0

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


def _json_path(path: tuple) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f"[{json.dumps(step)}]" for step in path) or "(top)"


def _unstorable_message(text: str) -> str:
    char = _UNSTORABLE.search(text).group()
    if char == "\x00":
        return "the NUL character (\\u0000), which Postgres cannot store"
    return f"a lone UTF-16 surrogate (\\u{ord(char):04x}), which is not valid Unicode text"


def json_value_problem(value, *, max_depth: int) -> str | None:
    """Why a parsed JSON value cannot be stored, or None.

    Iterative (an explicit stack), so a value nested past the interpreter's
    recursion limit is reported, not a `RecursionError`. About 1 µs per value:
    8 µs for typical 100-byte metadata, 0.6 ms for a 10 kB object of ~600 values
    (measured on 2 loaded cores).
    """
    stack = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                return f"Must not be nested more than {max_depth} levels deep (at {_json_path(path)})."
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str) and _UNSTORABLE.search(key):
                        return f"A key at {_json_path(path)} contains {_unstorable_message(key)}."
                    stack.append((child, depth + 1, (*path, key)))
            else:
                stack.extend((child, depth + 1, (*path, index)) for index, child in enumerate(item))
        elif isinstance(item, str):
            if _UNSTORABLE.search(item):
                return f"The string at {_json_path(path)} contains {_unstorable_message(item)}."
        elif (
            isinstance(item, int | float)
            and not isinstance(item, bool)
            and not -JSON_NUMBER_MAX <= item <= JSON_NUMBER_MAX  # NaN fails both comparisons
        ):
            return f"The number at {_json_path(path)} is outside ±{JSON_NUMBER_MAX} (a signed 64-bit integer)."
    return None


class JSONObjectField(serializers.JSONField):
    """A JSON object (not a list or scalar) that Postgres can store, of bounded size and depth."""

    default_error_messages = {
        "not_object": "Must be a JSON object.",
        "too_large": "Must be at most {max_bytes} bytes when serialized (UTF-8, no spaces).",
    }

    def __init__(self, *, max_bytes: int = 16 * 1024, max_depth: int = JSON_OBJECT_MAX_DEPTH, **kwargs):
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            self.fail("not_object")
        # Size first, in C: the walk below then looks at no more than max_bytes of JSON.
        try:
            size = len(orjson.dumps(data))
        except orjson.JSONEncodeError:
            size = None  # nested past 254 levels, a lone surrogate, or not JSON: the walk says which
        if size is not None and size > self.max_bytes:
            self.fail("too_large", max_bytes=self.max_bytes)
        problem = json_value_problem(data, max_depth=self.max_depth)
        if problem is not None:
            raise serializers.ValidationError(problem, code="invalid")
        if size is None:
            self.fail("invalid")
        return data


class StrictCharField(serializers.CharField):
    """A string field that refuses numbers and booleans instead of coercing them."""

    default_error_messages = {"not_string": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_string")
        return super().to_internal_value(data)


class StrictRegexField(StrictCharField, serializers.RegexField):
    pass


# Strict scalars: DRF's own coerce ("5" is 5, 1 is true, 123 a UUID, "yes" true), which would store a
# client's type error as some other value.
class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: written without a fraction or an exponent (`100`, not `100.0` nor `1e2`), which is
    also what the schema's `integer` promises; a float that happens to be whole (`7.09e16`) could have lost
    digits on the client's side already."""

    default_error_messages = {"not_integer": "Must be an integer (a JSON number without a fraction or exponent)."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("not_integer")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A finite JSON number (an integer too), not a string or a boolean."""

    default_error_messages = {"not_number": "Must be a finite number."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
            self.fail("not_number")
        return float(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"not_boolean": "Must be true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("not_boolean")
        return data


class StrictUUIDField(serializers.UUIDField):
    default_error_messages = {"invalid": "Must be a UUID string."}

    def to_internal_value(self, data):
        if not isinstance(data, str) or len(data) > 45:
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictDateTimeField(serializers.DateTimeField):
    """An ISO 8601 string (a timestamp without an offset is UTC); not a number, never a 500."""

    default_error_messages = {"not_datetime": "Must be an ISO 8601 date-time string, e.g. 2026-01-01T12:00:00Z."}

    def to_internal_value(self, value):
        if not isinstance(value, str) or len(value) > 64 or "\x00" in value:
            self.fail("not_datetime")
        try:
            return super().to_internal_value(value)
        except (OverflowError, TypeError):  # an offset that moves it out of datetime's range
            self.fail("not_datetime")
