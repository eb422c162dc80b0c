"""The shared input building blocks refuse what Postgres or the interpreter cannot take (no server, no database)."""

import base64
import io
import sys

import pytest
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.pagination import Cursor
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from iot.api.pagination import LimitCursorPagination
from iot.api.parsers import StrictJSONParser
from iot.api.serializers import JSON_OBJECT_MAX_DEPTH, JSONObjectField, json_value_problem


def parse(raw: bytes):
    return StrictJSONParser().parse(io.BytesIO(raw))


@pytest.mark.parametrize("depth", [1025, 5000, 100_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_parser_refuses_nesting_past_1024_levels(depth, opener):
    closer = "]" if opener == "[" else "}"
    with pytest.raises(ParseError) as error:
        parse((opener * depth + "1" * (opener != "[") + closer * depth).encode())
    assert str(error.value.detail).startswith("JSON parse error")


def test_parser_takes_nesting_deeper_than_the_recursion_limit():
    """1 024 levels parse (the fields bound depth), though the stdlib parser failed at ~1 000."""
    depth = 1024
    assert depth > sys.getrecursionlimit() - 100
    value = parse(b"[" * depth + b"]" * depth)
    for _ in range(depth - 1):
        value = value[0]
    assert value == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": "\\udc00"}',
        b'{"\\ud800": 1}',
        b'{"a": "\xed\xb0\x80"}',
        b'{"a": NaN}',
        b'{"a": 1e400}',
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": "\xff"}',
    ],
)
def test_parser_refuses_what_is_not_strict_utf8_json(raw):
    with pytest.raises(ParseError):
        parse(raw)


def test_parser_keeps_nul_for_the_fields_to_refuse():
    assert parse(b'{"a\\u0000": "\\u0000"}') == {"a\x00": "\x00"}


def field_errors(value, **kwargs) -> list[str]:
    with pytest.raises(ValidationError) as error:
        JSONObjectField(**kwargs).run_validation(value)
    return [str(message) for message in error.value.detail]


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"k": "a\x00b"}, 'The string at ["k"]'),
        ({"a\x00": 1}, "A key at (top)"),
        ({"site": {"rack": ["ok", "b\x00d"]}}, 'The string at ["site"]["rack"][1]'),
        ({"site": [{"\x00": None}]}, 'A key at ["site"][0]'),
    ],
)
def test_object_field_refuses_nul_and_says_where(value, where):
    (message,) = field_errors(value)
    assert message.startswith(where), message
    assert "NUL character (\\u0000)" in message


@pytest.mark.parametrize("value", [{"k": "\udc00"}, {"\ud800x": 1}, {"k": ["\udfff"]}])
def test_object_field_refuses_lone_surrogates(value):
    (message,) = field_errors(value)
    assert "lone UTF-16 surrogate" in message


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("number", [2**63, -(2**63), 1e20, -1.5e300, float("inf"), float("nan")])
def test_object_field_refuses_numbers_postgres_hands_back_too_big(number):
    (message,) = field_errors({"a": [1, {"n": number}]})
    assert message.startswith('The number at ["a"][1]["n"] is outside'), message


def test_object_field_takes_numbers_within_64_bits():
    value = {"a": 2**63 - 1, "b": -(2**63 - 1), "c": 1e18, "d": 1e-300, "e": True, "f": 0.5}
    assert JSONObjectField().run_validation(value) == value


def test_object_field_depth_is_bounded():
    assert json_value_problem(nested(JSON_OBJECT_MAX_DEPTH), max_depth=JSON_OBJECT_MAX_DEPTH) is None
    assert JSONObjectField().run_validation(nested(JSON_OBJECT_MAX_DEPTH)) == nested(JSON_OBJECT_MAX_DEPTH)
    (message,) = field_errors(nested(JSON_OBJECT_MAX_DEPTH + 1))
    assert f"more than {JSON_OBJECT_MAX_DEPTH} levels" in message


@pytest.mark.parametrize("depth", [300, 5000])
def test_object_field_reports_depth_past_the_recursion_limit_without_recursing(depth):
    """Deeper than orjson serializes (254) and than Python recurses: the walk is iterative."""
    (message,) = field_errors(nested(depth))
    assert "levels deep" in message


def test_object_field_size_counts_utf8_bytes():
    value = {"k": "é" * 3}  # {"k":"ééé"}: 14 bytes of UTF-8 (26 characters as ASCII-escaped JSON)
    assert JSONObjectField(max_bytes=14).run_validation(value) == value
    assert "at most 13 bytes" in field_errors(value, max_bytes=13)[0]


@pytest.mark.parametrize("value", [[], "text", 1, None])
def test_object_field_wants_an_object(value):
    assert field_errors(value, allow_null=False) in (["Must be a JSON object."], ["This field may not be null."])


# --- Cursors ------------------------------------------------------------------------------


def decode(cursor: str | None):
    query = {} if cursor is None else {"cursor": cursor}
    return LimitCursorPagination().decode_cursor(Request(APIRequestFactory().get("/devices", query)))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_cursors_the_server_encodes_decode_to_the_same_position():
    pagination = LimitCursorPagination()
    pagination.base_url = "http://testserver/devices"
    for cursor in [
        Cursor(offset=0, reverse=False, position="2024-05-01 12:00:00.250000+00:00"),
        Cursor(offset=3, reverse=True, position="2024-05-01 14:00:00+02:00"),
        Cursor(offset=0, reverse=True, position=None),
    ]:
        encoded = pagination.encode_cursor(cursor).split("cursor=")[1]
        decoded = decode(encoded.replace("%3D", "="))
        assert (decoded.offset, decoded.reverse) == (cursor.offset, cursor.reverse)
        if cursor.position is None:
            assert decoded.position is None
        else:
            assert decoded.position.endswith("+00:00")
    assert decode(None) is None


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "%%%",
        "\u00e9t\u00e9",
        b64("o=-1"),
        b64("o=1001"),
        b64("r=2"),
        b64("o=1&o=2"),
        b64("x=1"),
        b64("p=not-a-date"),
        b64("p=2024-01-01T00:00:00\x00"),
        b64("p=9999-12-31T23:59:59-01:00"),
        b64("o=1&&p"),
    ],
)
def test_cursors_the_server_did_not_make_are_400(cursor):
    with pytest.raises(ValidationError) as error:
        decode(cursor)
    assert list(error.value.detail) == ["cursor"]
