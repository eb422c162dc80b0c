"""The OpenAPI schema is written for API clients: no implementation notes, no endpoints that don't exist."""

import re

import orjson
import pytest
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer

# What an API client cannot act on: how the server is built, and measured costs.
INTERNAL = re.compile(
    r"\b(lua|unnest|redis\w*|postgres\w*|sql|orm|bridge|serializer|hot path|module docs?|statement|cache[ds]?)\b"
    r"|\d\s*(ms|µs)\b",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def spec() -> dict:
    return orjson.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


def texts(node, where=""):
    """Every description and summary in the schema, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("description", "summary", "title") and isinstance(value, str):
                yield f"{where}/{key}", value
            else:
                yield from texts(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from texts(value, f"{where}/{index}")


def test_descriptions_carry_no_implementation_notes(spec):
    found = [(where, text) for where, text in texts(spec) if INTERNAL.search(text)]
    assert found == []
    assert len(list(texts(spec))) > 50  # the walk did look at the descriptions


def test_the_api_description_names_only_what_exists(spec):
    description = spec["info"]["description"].lower()
    for area in ("firmware", "alert", "analytics"):
        if any(path.startswith(f"/{area}") for path in spec["paths"]):
            continue
        assert area not in description, f"{area!r} is described but has no endpoint yet"
    for path in ("/devices", "/telemetry/point"):
        assert path in spec["paths"]
    assert "Token <key>" in spec["info"]["description"] and "Device <token>" in spec["info"]["description"]
