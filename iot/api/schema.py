"""The OpenAPI schema (`/api/schema`) says what the server does: drf-spectacular extensions and shared answers.

drf-spectacular documents what it can infer from DRF. What it cannot, said here:

* `Authorization: Device <token>` (`devices.authentication.DeviceTokenAuthentication`)
  is a security scheme, required only on the views that let devices in
  (`IsOperatorOrDevice`); without it every schema build warned "could not
  resolve authenticator". The operator token (`iot.api.authentication.
  CachedTokenAuthentication`) resolves as drf-spectacular's `tokenAuth`, a
  subclass of DRF's `TokenAuthentication`.
* `iot.api.serializers.StrictInputSerializer` refuses unknown fields (400), so its
  request bodies are `additionalProperties: false`; `min_fields` becomes
  `minProperties`; a nested list's `min_length`/`max_length` become
  `minItems`/`maxItems` (the batch's 1 to `TELEMETRY_BATCH_MAX_POINTS` points).
* `JSONObjectField` is an object of bounded size and depth, not "any value".
* Refusals have bodies: `ERROR` (`detail`, sometimes `code` and figures) and
  `VALIDATION_ERROR` (400/422: each bad field mapped to its messages).

Imported by the views that use `error_responses`, so the extensions are
registered before any schema is generated (the URLconf imports the views).
"""

from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)
from drf_spectacular.plumbing import build_array_type, build_basic_type, force_instance
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from iot.api.permissions import IsOperatorOrDevice
from iot.api.serializers import JSON_NUMBER_MAX


class DeviceTokenScheme(OpenApiAuthenticationExtension):
    target_class = "devices.authentication.DeviceTokenAuthentication"
    name = "deviceTokenAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": 'A device\'s own credential, sent as "Device <token>" (the `device_token` of its '
            "registration). Accepted only where a device may act: its own telemetry.",
        }

    def get_security_requirement(self, auto_schema):
        # Every view authenticates device tokens, but operator-only views then answer 403:
        # the requirement is listed only where a device is let in.
        if any(isinstance(permission, IsOperatorOrDevice) for permission in auto_schema.view.get_permissions()):
            return {self.name: []}
        return None


class StrictInputSerializerSchema(OpenApiSerializerExtension):
    target_class = "iot.api.serializers.StrictInputSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        serializer = force_instance(self.target)
        schema = auto_schema._map_serializer(serializer, direction, bypass_extensions=True)
        if direction != "request":
            return schema
        schema["additionalProperties"] = False
        if serializer.min_fields:
            schema["minProperties"] = serializer.min_fields
        for name, field in serializer.fields.items():
            if isinstance(field, serializers.ListSerializer) and name in schema.get("properties", {}):
                if field.min_length is not None:
                    schema["properties"][name]["minItems"] = field.min_length
                if field.max_length is not None:
                    schema["properties"][name]["maxItems"] = field.max_length
        return schema


class JSONObjectFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "iot.api.serializers.JSONObjectField"

    def map_serializer_field(self, auto_schema, direction):
        field = self.target
        return {
            "type": "object",
            "additionalProperties": {},
            "description": f"A JSON object of at most {field.max_bytes} bytes (compact UTF-8) and "
            f"{field.max_depth} levels of nesting; no string or key may contain NUL (\\u0000), and numbers "
            f"stay within ±{JSON_NUMBER_MAX}.",
        }


# --- Refusals ------------------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    """A refusal: a message, and for some a machine-readable `code` and figures (e.g. `limit`)."""

    detail = serializers.CharField()
    code = serializers.CharField(required=False, help_text="Set where clients act on the kind of refusal.")


class ValidationErrorSerializer(serializers.Serializer):
    """Bad input: each offending field (or query parameter, or `points[3].value`) mapped to its messages.

    `non_field_errors` is about the body as a whole; a body that is not JSON gets `detail` alone.
    """

    detail = serializers.CharField(required=False)
    non_field_errors = serializers.ListField(child=serializers.CharField(), required=False)


class ValidationErrorSchema(OpenApiSerializerExtension):
    target_class = ValidationErrorSerializer

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["additionalProperties"] = build_array_type(build_basic_type(OpenApiTypes.STR))
        return schema


VALIDATION_STATUSES = frozenset({400, 422})

AUTH_REFUSALS = {
    401: "No credentials, or credentials that are not valid.",
    403: "These credentials may not do this.",
}


def error_responses(refusals: dict[int, str], *, auth: bool = True) -> dict[int, OpenApiResponse]:
    """`{status: description}` -> documented answers with their bodies (plus 401/403 unless `auth=False`)."""
    described = {**(AUTH_REFUSALS if auth else {}), **refusals}
    return {
        status: OpenApiResponse(
            response=ValidationErrorSerializer if status in VALIDATION_STATUSES else ErrorSerializer,
            description=description,
        )
        for status, description in sorted(described.items())
    }


MALFORMED_BODY = "Bad input: a body that is not a JSON object, an unknown field, or a field's value; nothing stored."
UNSUPPORTED_MEDIA = "The body is not `application/json`."
BAD_QUERY = "A query parameter that is unknown or has a bad value."
