"""The README's walk-through (register a device, send a point, read it back) works as written.

Its shell blocks are read out of README.md and run against the live platform: `curl` lines
as HTTP requests, `NAME=$(...)` lines by running the command (`make manage ARGS="..."` as
the same management command on the test database), and a `NAME=... # "field" from the answer`
line from the previous answer's JSON, as a reader would copy it. The base URL and the example
serial number are replaced by the live server's and a fresh one.
"""

import re
import shlex
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from iot.testing.processes import run_manage

pytestmark = pytest.mark.live

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Register a device, send a point, read it back"
README_BASE_URL = "http://127.0.0.1:8000"
README_SERIAL = "SN-0001"


def walkthrough_lines() -> list[str]:
    text = README.read_text()
    assert SECTION in text, "the README lost its walk-through"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def expand(text: str, variables: dict[str, str]) -> str:
    def value(match):
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is used before the walk-through sets it"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def command_output(command: str, env: dict[str, str]) -> str:
    """What `$(command)` gives: a `make manage` runs as its management command against the test platform."""
    make_manage = re.fullmatch(r'make manage ARGS="([^"]*)"\s*\|\s*tail -n 1', command)
    if make_manage:
        return run_manage(env, *shlex.split(make_manage.group(1))).strip().splitlines()[-1]
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.strip()


def curl(argv: list[str]) -> tuple[str, str, dict[str, str], str | None]:
    """(method, url, headers, body) of a curl command line using -s, -X, -H and -d."""
    method, url, headers, body = None, None, {}, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-s":
            continue
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(args)
        else:
            assert not arg.startswith("-"), f"curl option {arg} is not understood by this test"
            url = arg
    return method or ("POST" if body is not None else "GET"), url, headers, body


def test_the_readme_walkthrough_runs_as_written(platform):
    serial = f"SN-README-{uuid.uuid4().hex[:12]}"
    variables: dict[str, str] = {}
    answer: dict | list | None = None
    exchanges = []
    with httpx.Client(timeout=30) as client:
        for line in walkthrough_lines():
            assignment = re.fullmatch(r"(\w+)=(.*)", line)
            if assignment:
                name, rest = assignment.groups()
                substitution = re.fullmatch(r"\$\((.*)\)", rest.strip())
                from_answer = re.search(r'#\s*"(\w+)" from the answer', rest)
                if substitution:
                    variables[name] = command_output(substitution.group(1), platform.env)
                elif from_answer:
                    variables[name] = str(answer[from_answer.group(1)])
                else:
                    pytest.fail(f"the test does not know where {line!r} gets its value")
                continue
            argv = shlex.split(line)
            assert argv[0] == "curl", f"unexpected command in the walk-through: {line!r}"
            argv = [expand(arg, variables).replace(README_SERIAL, serial) for arg in argv]
            method, url, headers, body = curl(argv)
            assert url.startswith(README_BASE_URL), url
            response = client.request(
                method, platform.base_url + url.removeprefix(README_BASE_URL), headers=headers, content=body
            )
            assert response.is_success, (line, response.status_code, response.text)
            answer = response.json()
            exchanges.append((method, urlsplit(url).path, response.status_code, answer))

    device_id = variables["DEVICE_ID"]
    assert [(method, path, status) for method, path, status, _ in exchanges] == [
        ("POST", "/devices", 201),
        ("POST", "/telemetry/point", 202),
        ("GET", f"/telemetry/{device_id}", 200),
        ("GET", f"/telemetry/{device_id}/temperature/latest", 200),
        ("GET", "/devices", 200),
    ]
    registered, accepted, points, latest, found = (answer for *_, answer in exchanges)
    assert registered["serial_number"] == serial and registered["device_token"] == variables["DEVICE_TOKEN"]
    assert accepted == {"status": "accepted"}
    assert [(p["metric"], p["value"]) for p in points] == [("temperature", 21.5)]
    assert latest["value"] == 21.5
    assert [(d["id"], d["status"]) for d in found["results"]] == [(device_id, "active")]
    assert found["results"][0]["last_seen"] is not None
