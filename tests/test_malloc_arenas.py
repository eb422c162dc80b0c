"""The platform's processes run with glibc's malloc arenas capped (MALLOC_ARENA_MAX, scripts/platform.py).

With glibc's own limit (8 per core) each of a web process's request threads could get an arena
that keeps the free memory of its own peak: 6-7 MiB more RSS per process under 1000-point
batches (bench/web_rss.py). Checked on the function that decides the value, and on the live
platform's web processes (uvicorn's and its workers').
"""

import importlib.util
import sys
from pathlib import Path

import psutil
import pytest

from iot.testing.processes import REPO_ROOT


@pytest.fixture
def platform_script(monkeypatch):
    """scripts/platform.py as a module, with its `supervisor` import served (scripts/ is kept off sys.path:
    there `platform.py` would shadow the standard library's `platform`)."""
    modules = {}
    for name, filename in (("supervisor", "supervisor.py"), ("platform_script", "platform.py")):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / filename)
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, modules[name])
        spec.loader.exec_module(modules[name])
    return modules["platform_script"]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_two_arenas_unless_malloc_arena_max_is_set(platform_script, monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert platform_script.malloc_environment() == {"MALLOC_ARENA_MAX": "2"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", " ")  # empty is unset, as for the other settings
    assert platform_script.malloc_environment() == {"MALLOC_ARENA_MAX": "2"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert platform_script.malloc_environment() == {"MALLOC_ARENA_MAX": "8"}


@pytest.mark.live
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_the_live_web_processes_run_with_the_cap(platform):
    web = next(managed for managed in platform.processes if managed.name == "web")
    server = psutil.Process(web.process.pid)  # `platform.py web` exec'd uvicorn in place
    processes = [server, *server.children(recursive=True)]
    assert len(processes) >= 3, "uvicorn and its two workers"
    expected = (platform.env.get("MALLOC_ARENA_MAX") or "").strip() or "2"
    assert {environ_of(process.pid).get("MALLOC_ARENA_MAX") for process in processes} == {expected}
