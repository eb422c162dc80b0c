"""The OpenAPI schema says what the server does, and builds without a warning (no server, no database)."""

import orjson
import pytest
from django.conf import settings
from django.core.management import call_command
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer


@pytest.fixture(scope="module")
def spec() -> dict:
    return orjson.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


def component(spec: dict, ref_holder: dict) -> dict:
    return spec["components"]["schemas"][ref_holder["$ref"].rsplit("/", 1)[1]]


def request_schema(spec: dict, path: str, method: str) -> dict:
    return component(spec, spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"])


def test_schema_builds_and_validates_without_any_warning(tmp_path):
    """Every fetch of /api/schema used to log "could not resolve authenticator DeviceTokenAuthentication"."""
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert (tmp_path / "schema.yaml").stat().st_size > 0


def test_device_tokens_are_a_security_scheme_where_devices_are_let_in(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["deviceTokenAuth"]["type"] == "apiKey"
    assert schemes["deviceTokenAuth"]["name"] == "Authorization"
    assert "Device <token>" in schemes["deviceTokenAuth"]["description"]
    assert 'prefix "Token"' in schemes["tokenAuth"]["description"]  # the cached operator token
    for path in ("/telemetry/point", "/telemetry/batch"):
        assert {"deviceTokenAuth": []} in spec["paths"][path]["post"]["security"]
        assert {"tokenAuth": []} in spec["paths"][path]["post"]["security"]
    assert {"deviceTokenAuth": []} in spec["paths"]["/telemetry/{device_id}"]["get"]["security"]
    # Operator-only endpoints answer 403 to a device: the scheme is not offered there.
    for method in ("get", "post"):
        assert {"deviceTokenAuth": []} not in spec["paths"]["/devices"][method]["security"]
        assert {"tokenAuth": []} in spec["paths"]["/devices"][method]["security"]


@pytest.mark.parametrize(
    ("path", "method", "statuses"),
    [
        ("/devices", "get", {"200", "400", "401", "403"}),
        ("/devices", "post", {"200", "201", "400", "401", "403", "409", "415", "422"}),
        ("/devices/{id}", "get", {"200", "401", "403", "404"}),
        ("/devices/{id}", "patch", {"200", "400", "401", "403", "404", "415"}),
        ("/telemetry/{device_id}", "get", {"200", "400", "401", "403", "404"}),
        ("/telemetry/{device_id}/{metric}/latest", "get", {"200", "401", "403", "404"}),
        ("/telemetry/{device_id}/{metric}/series", "get", {"200", "400", "401", "403", "404", "422"}),
        ("/telemetry/point", "post", {"202", "400", "401", "403", "409", "415", "422", "429", "503"}),
        ("/telemetry/batch", "post", {"202", "400", "401", "403", "409", "415", "422", "429", "503"}),
    ],
)
def test_every_answer_the_server_gives_is_documented_with_its_body(spec, path, method, statuses):
    responses = spec["paths"][path][method]["responses"]
    assert set(responses) == statuses
    for status in statuses - {"200", "201", "202"}:
        body = responses[status]["content"]["application/json"]["schema"]
        expected = "ValidationError" if status in ("400", "422") else "Error"
        assert body == {"$ref": f"#/components/schemas/{expected}"}, (status, body)
        assert responses[status]["description"]


def test_error_bodies_are_described(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["Error"]["required"] == ["detail"]
    assert schemas["ValidationError"]["additionalProperties"] == {"type": "array", "items": {"type": "string"}}


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/devices", "post"),
        ("/devices/{id}", "patch"),
        ("/telemetry/point", "post"),
        ("/telemetry/batch", "post"),
    ],
)
def test_request_bodies_refuse_unknown_fields_as_the_server_does(spec, path, method):
    assert request_schema(spec, path, method)["additionalProperties"] is False


def test_batch_points_are_bounded_and_each_point_is_strict(spec):
    batch = request_schema(spec, "/telemetry/batch", "post")
    points = batch["properties"]["points"]
    assert points["minItems"] == 1
    assert points["maxItems"] == settings.TELEMETRY_BATCH_MAX_POINTS
    assert component(spec, points["items"])["additionalProperties"] is False


def test_an_empty_patch_is_outside_the_schema(spec):
    assert request_schema(spec, "/devices/{id}", "patch")["minProperties"] == 1


def test_metadata_is_an_object_not_any_value(spec):
    metadata = request_schema(spec, "/devices", "post")["properties"]["metadata"]
    assert metadata["type"] == "object"
    assert "NUL" in metadata["description"]


def test_query_parameters_and_ids_are_documented(spec):
    listing = {p["name"]: p for p in spec["paths"]["/devices"]["get"]["parameters"]}
    assert set(listing) == {"cursor", "group_id", "limit", "serial_number", "status"}
    assert (listing["limit"]["schema"]["minimum"], listing["limit"]["schema"]["maximum"]) == (1, 1000)
    device = {p["name"]: p for p in spec["paths"]["/devices/{id}"]["get"]["parameters"]}
    assert device["id"]["schema"] == {"type": "string", "format": "uuid"}
    latest = {p["name"]: p for p in spec["paths"]["/telemetry/{device_id}/{metric}/latest"]["get"]["parameters"]}
    assert latest["metric"]["schema"]["maxLength"] == 128
