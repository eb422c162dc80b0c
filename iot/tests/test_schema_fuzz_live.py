"""Schema-driven fuzzing of the live server: every answer is documented, none is a 5xx.

schemathesis takes the schema `/api/schema` serves and, for every operation,
sends requests built from it to the running multi-process platform, as an
operator: boundary values and invalid parameters/bodies ("coverage"), then
generated valid and invalid requests ("fuzzing"). Each answer must:

* not be a 5xx (nothing is down here, so a 503 is a failure too);
* have a status code the schema documents for that operation (a 429 of the
  rate limiter is documented, so tripping it while fuzzing is fine);
* have the documented content type and a body matching the documented schema;
* refuse (4xx) what the schema calls invalid: the schema is no looser than the server.

Valid requests are aimed at a device that exists (path ids and bodies'
`device_id`), so they get past "unknown device" to the code that stores and
reads. Deterministic (`derandomize`, no example database) and bounded: about
half a minute on 2 cores (`FUZZ_EXAMPLES` per operation).
"""

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.live

FUZZ_EXAMPLES = 150

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _app_schema() -> dict:
    """The schema `/api/schema` serves, built in-process at collection (no server runs yet).

    schemathesis needs the operations to create the tests, and its lazy loader
    (`schemathesis.pytest.from_fixture`) does not run under pytest 9. That the
    live server serves exactly this is the first test.
    """
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    return orjson.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


APP_SCHEMA = _app_schema()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)


def test_the_live_server_serves_the_fuzzed_schema_without_warnings(platform, anonymous):
    response = anonymous.get("/api/schema", headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.json() == APP_SCHEMA
    # drf-spectacular prints what it could not resolve to the server's stderr on every fetch
    # ("Warning [DeviceViewSet]: could not resolve authenticator ...").
    (web,) = [process for process in platform.processes if process.name == "web"]
    log = web.log_path.read_text(errors="replace")
    assert "could not resolve" not in log and "Warning [" not in log and "Error [" not in log


@pytest.fixture(scope="module")
def operator_session(operator_token):
    with requests.Session() as session:
        session.headers["Authorization"] = f"Token {operator_token}"
        yield session


@pytest.fixture(scope="module")
def fuzz_device_id(api, platform) -> str:
    response = api.post(
        "/devices", json={"serial_number": "SN-FUZZ-TARGET", "device_type": "sensor", "firmware_version": "1.0.0"}
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def _aim_at(case, device_id: str) -> None:
    """A valid request names the existing device instead of a random UUID (invalid ones stay as generated)."""
    if case.meta is None or case.meta.generation.mode.is_negative:
        return
    for name in ("id", "device_id"):
        if name in (case.path_parameters or {}):
            case.path_parameters[name] = device_id
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("device_id"), str):
        body["device_id"] = device_id
        for point in body.get("points") or []:
            if isinstance(point, dict) and "device_id" in point:
                point["device_id"] = device_id


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # A live server is slow next to in-process generation, and schemas with patterns filter a lot.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
def test_every_answer_is_documented_and_never_a_server_error(case, platform, operator_session, fuzz_device_id):
    _aim_at(case, fuzz_device_id)
    case.call_and_validate(base_url=platform.base_url, session=operator_session, checks=CHECKS, timeout=30)
