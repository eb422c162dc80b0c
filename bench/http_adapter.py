#!/usr/bin/env python
"""HTTP adapters compared on the real server with wrk: req/s, p50, p99, CPU per request, ratios.

    python scripts/devservices.py --instance bench run -- python bench/http_adapter.py
    python bench/http_adapter.py --rounds 2 --connections 64 --web-concurrency 2   # DATABASE_URL/REDIS_URL set

Every server is exactly what `make web` starts (uvicorn with the flags of
`scripts/platform.py web`, WEB_CONCURRENCY processes) on a fresh database, with only
the ASGI application swapped (`bench/_http_apps.py`: `bridge` is the platform's,
`a2wsgi` needs `pip install a2wsgi==1.10.10`), driven by `wrk` (a C load generator:
a Python client tops out before the server does; the `wrk` Debian package). Several
servers run at once and each holds database connections as it warms up, so a
Postgres of its own (the first line) keeps a shared one's `max_connections` free.
Endpoints:

* `GET /health/live`: a trivial Django view through the whole middleware stack, the
  ceiling of any Django request (the `hello` app, no Django, is uvicorn's own ceiling);
* `POST /telemetry/point`: a real write (auth, validation, rate limit, insert, event),
  a new point per request from a wrk Lua script; rate limits raised by environment
  as in bench/ingest.py, so the adapter and the platform are measured, not the limits.

For each WEB_CONCURRENCY all servers run at once (an idle one costs nothing) and the
adapters take turns measurement by measurement, the order flipping every round, so
that a machine shared with other work drifts across both alike. Besides wrk's req/s
and latencies it records the server processes' CPU time per request, which moves far
less with the machine's other load: the figure that tells a small adapter overhead
from noise. The summary gives medians over the rounds and ratios paired by round.
The figures and what they decided: `iot/asgi_bridge.py`.
"""

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import httpx
import psutil
from _harness import api_token, fresh_database
from ingest import BENCH_ENV

from iot.testing.processes import free_port, platform_env

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

TRIVIAL = "GET /health/live"

LUA_POINT = """
-- One new point per request: thread id and a counter make every (device, metric, ts) unique.
local device = os.getenv("BENCH_DEVICE_ID")
local auth = "Token " .. os.getenv("BENCH_TOKEN")
local base = tonumber(os.getenv("BENCH_BASE_EPOCH"))
local threads = 0
local counter = 0
tid = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

request = function()
  counter = counter + 1
  local micro = tid * 500000 + counter
  local stamp = os.date("!%Y-%m-%dT%H:%M:%S", base + math.floor(micro / 1000000))
  local body = string.format(
    '{"device_id":"%s","timestamp":"%s.%06dZ","metric":"temperature","value":%d}',
    device, stamp, micro % 1000000, counter % 50)
  return wrk.format("POST", "/telemetry/point",
    {["Content-Type"] = "application/json", ["Authorization"] = auth}, body)
end
"""


@dataclass(frozen=True)
class Figures:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus socket errors
    cpu_ms: float = float("nan")  # CPU time of the server's processes per request (user + system)


def _web_argv(app: str, *, port: int, workers: int) -> list[str]:
    """`scripts/platform.py web`'s uvicorn command line, with `app` instead of `iot.asgi:application`."""
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.append(scripts)  # platform.py imports its neighbour supervisor.py
    spec = importlib.util.spec_from_file_location("platform_script", REPO_ROOT / "scripts" / "platform.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with mock.patch.dict(os.environ, {"PORT": str(port), "WEB_CONCURRENCY": str(workers), "HOST": "127.0.0.1"}):
        argv = module.web_argv()
    return [app if arg == "iot.asgi:application" else arg for arg in argv]


@dataclass(frozen=True)
class Server:
    base_url: str
    processes: list[psutil.Process]  # uvicorn's supervisor and its workers

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes)


@contextmanager
def server(app: str, *, database: str, workers: int):
    port = free_port()
    metrics_dir = Path(tempfile.mkdtemp(prefix="iot-prom-"))
    env = platform_env(
        database=database,
        extra={
            "DJANGO_SETTINGS_MODULE": "iot.settings",
            "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "bench-only-secret-key"),
            "REDIS_KEY_PREFIX": os.environ.get("REDIS_KEY_PREFIX", "iotbench"),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])),
            **BENCH_ENV,
        },
    )
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            _web_argv(f"_http_apps:{app}", port=port, workers=workers),
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{app} server exited:\n{log.read()[-3000:].decode(errors='replace')}")
                try:
                    if httpx.get(f"{base_url}/health/live", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{app} server not live after 60 s")
                time.sleep(0.1)
            yield Server(base_url, [root := psutil.Process(process.pid), *root.children(recursive=True)])
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            shutil.rmtree(metrics_dir, ignore_errors=True)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * _UNITS[unit]


def wrk(url: str, *, connections: int, duration: int, script: Path | None = None, env=None) -> Figures:
    threads = min(2, connections)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency", "--timeout", "10s"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True, env=env).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    if set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return Figures(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
        requests=int(re.search(r"(\d+) requests in", out).group(1)),
        errors=errors,
    )


def register_device(base_url: str, token: str) -> str:
    response = httpx.post(
        f"{base_url}/devices",
        headers={"Authorization": f"Token {token}"},
        json={"serial_number": f"SN-HTTP-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default="bridge,a2wsgi", help="names in bench/_http_apps.py")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--connections", default="64,4")
    parser.add_argument("--web-concurrency", default="2,4")
    parser.add_argument("--database", default="iot_bench_http", help="name of the (recreated) database")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found (apt-get install wrk)")
    adapters = args.adapters.split(",")
    if "a2wsgi" in adapters and importlib.util.find_spec("a2wsgi") is None:
        sys.exit("a2wsgi is not installed (pip install a2wsgi==1.10.10)")
    connections = [int(c) for c in args.connections.split(",")]
    concurrencies = [int(w) for w in args.web_concurrency.split(",")]

    database = fresh_database(args.database)
    token = api_token(database)
    with server(adapters[0], database=database, workers=1) as target:
        device_id = register_device(target.base_url, token)
    workdir = Path(tempfile.mkdtemp(prefix="iot-bench-http-"))
    lua = workdir / "point.lua"
    lua.write_text(LUA_POINT)
    endpoints = {TRIVIAL: ("/health/live", None), "POST /telemetry/point": ("/telemetry/point", lua)}

    def measure(target: Server, endpoint: str, conns: int, duration: int) -> Figures:
        path, script = endpoints[endpoint]
        env = {**os.environ, "BENCH_DEVICE_ID": device_id, "BENCH_TOKEN": token}
        env["BENCH_BASE_EPOCH"] = str(int(time.time()) - 900)  # a new second per run: every point is new
        before = target.cpu_seconds()
        figures = wrk(target.base_url + path, connections=conns, duration=duration, script=script, env=env)
        return replace(figures, cpu_ms=(target.cpu_seconds() - before) * 1000 / max(figures.requests, 1))

    results: dict[tuple, list[Figures]] = {}
    for workers in concurrencies:
        # All servers up at once (an idle one costs nothing), so that the adapters can alternate
        # measurement by measurement: drift on a shared machine then hits both alike.
        with contextlib.ExitStack() as stack:
            servers = {
                name: stack.enter_context(server(name, database=database, workers=workers))
                for name in ["hello", *adapters]
            }
            for name, target in servers.items():  # warm every process up: imports, pools, caches
                for endpoint in endpoints if name != "hello" else [TRIVIAL]:
                    measure(target, endpoint, max(connections), 2)
            for round_number in range(args.rounds):
                order = adapters if round_number % 2 == 0 else adapters[::-1]
                for endpoint in endpoints:
                    for conns in connections:
                        for name in (["hello"] if endpoint == TRIVIAL else []) + order:
                            figures = measure(servers[name], endpoint, conns, args.duration)
                            results.setdefault((workers, endpoint, conns, name), []).append(figures)
                            print(
                                f"round {round_number + 1} WEB_CONCURRENCY={workers} {endpoint:<22} c={conns:<3} "
                                f"{name:<7} {figures.rps:8.0f} req/s  p50 {figures.p50_ms:6.2f} ms  "
                                f"p99 {figures.p99_ms:6.2f} ms  cpu {figures.cpu_ms:5.2f} ms/req  "
                                f"errors {figures.errors}",
                                flush=True,
                            )
    shutil.rmtree(workdir, ignore_errors=True)
    report(results, adapters, concurrencies, connections, list(endpoints))


def report(results, adapters, concurrencies, connections, endpoints) -> None:
    """Medians over the rounds; ratios are per round (same minutes of the same machine), then the median.

    On a shared machine req/s and latencies move with whatever else runs; the server's CPU time per
    request moves far less, so it is the figure that tells a small adapter overhead from noise.
    """

    def median(key, attribute):
        return statistics.median(getattr(f, attribute) for f in results[key])

    def paired(key, other, attribute) -> str:
        pairs = zip(results[key], results[other], strict=True)
        ratios = sorted(getattr(a, attribute) / getattr(b, attribute) for a, b in pairs)
        return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"

    first = adapters[0]
    rounds = len(next(iter(results.values())))
    print(f"\nmedians of {rounds} rounds; 'of trivial': req/s over the same adapter's {TRIVIAL} (its ceiling);")
    print(f"'vs {first}': ratios to {first}'s figures paired by round, median (min-max); cpu = server CPU time.")
    for workers in concurrencies:
        for conns in connections:
            hello = (workers, TRIVIAL, conns, "hello")
            print(
                f"\nWEB_CONCURRENCY={workers}, {conns} connections (uvicorn alone, no Django: "
                f"{median(hello, 'rps'):,.0f} req/s, cpu {median(hello, 'cpu_ms'):.2f} ms/req)"
            )
            for endpoint in endpoints:
                for adapter in adapters:
                    key = (workers, endpoint, conns, adapter)
                    errors = sum(f.errors for f in results[key])
                    print(
                        f"  {endpoint:<22} {adapter:<7} {median(key, 'rps'):7,.0f} req/s  "
                        f"p50 {median(key, 'p50_ms'):6.2f} ms  p99 {median(key, 'p99_ms'):7.2f} ms  "
                        f"cpu {median(key, 'cpu_ms'):5.2f} ms/req  "
                        f"of trivial {paired(key, (workers, TRIVIAL, conns, adapter), 'rps')[:4]}"
                        + (f"  errors {errors}" if errors else "")
                    )
                    if adapter != first:
                        other = (workers, endpoint, conns, first)
                        print(
                            f"  {'':<22} vs {first}: req/s {paired(key, other, 'rps')}, "
                            f"cpu/req {paired(key, other, 'cpu_ms')}"
                        )


if __name__ == "__main__":
    main()
