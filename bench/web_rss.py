#!/usr/bin/env python
"""Resident memory of ONE web process by telemetry points accepted (issue 12's memory row).

    python bench/web_rss.py                                   # variants glibc and platform, 0..2M points
    python bench/web_rss.py --variants platform --checkpoints 100000,1000000
    python bench/web_rss.py --probe                           # + what the heap holds at each checkpoint
    python bench/web_rss.py --variants platform --tracemalloc # + where Python memory grew (2-3x slower)

Each variant starts a fresh web process (`scripts/platform.py web`, WEB_CONCURRENCY=1, the
platform's settings, the limits out of the way: `_harness.UNLIMITED_ENV`) and drives it with
`wrk` and `bench/wrk/batch.lua`: 1000-point `POST /telemetry/batch` requests (~73 KB bodies,
spooled to a temporary file by the ASGI bridge) on 16 connections, as `make bench`'s memory row
does. At each checkpoint of points accepted (202s x 1000) it prints the process's RSS, where it
lies (`/proc/PID/smaps`: `[heap]` is glibc's main arena; `anon` holds pymalloc's 1 MiB arenas,
glibc's per-thread arenas, thread stacks) and the process's CPU per request. No consumer runs:
the driver empties the event stream between loads, so only the web process is measured.

Variants (the web process's MALLOC_ARENA_MAX): `platform` what `scripts/platform.py` sets;
`glibc` glibc's own limit, 8 per core; `arenas=N` that limit.

`--probe` serves through this file instead (`_serve`: uvicorn with the same arguments) and, at
each checkpoint, has the server report what its heap holds: the objects the garbage collector
tracks, what a full collection then frees (request objects in reference cycles: memory held
only until the next full collection), pymalloc's arenas against the bytes in use in them, and
glibc's bytes in use against the free bytes it keeps (`mallinfo2`). A leak grows the objects and
the bytes in use with the points; a high-water mark grows neither, only arenas and free bytes.

Figures of issue 12 (2 loaded cores; before = commit 3ba385e, after = the parsed body dropped
once used, `telemetry/api/views.py`, and MALLOC_ARENA_MAX=2): docs/perf/README.md.
To measure another commit, run this file from a copy of it (docs/perf/README.md says how).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

CONNECTIONS = 16
BATCH = 1000
DEFAULT_CHECKPOINTS = "0,100000,500000,1000000,2000000"


def _platform_script():
    """scripts/platform.py as a module (imported by its name it would shadow the standard library's `platform`)."""
    sys.path.append(str(REPO_ROOT / "scripts"))  # for its `supervisor` import; appended, so it shadows nothing
    spec = importlib.util.spec_from_file_location("platform_script", REPO_ROOT / "scripts" / "platform.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the server side of --probe -------------------------------------------------------------------------------


def _serve(probe_file: str, *, trace: bool) -> None:
    """The web server as `scripts/platform.py web` execs it, plus a memory report on SIGUSR1.

    With `trace`, tracemalloc runs from the start: it takes over pymalloc's entry points, so
    pymalloc's own figures are then missing (-1), and the server runs 2-3x slower.
    """
    import ctypes
    import gc
    import tracemalloc

    import uvicorn.main

    if trace:
        tracemalloc.start(8)
    libc = ctypes.CDLL("libc.so.6")
    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    libc.mallinfo2.restype = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(n, ctypes.c_size_t) for n in names]})
    first: list = []

    def report(signum, frame) -> None:
        before = _pymalloc_stats()["pymalloc_in_use"]
        unreachable = gc.collect()
        grown = []
        if trace:
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            first[:] = first or [snapshot]
            grown = [stat for stat in snapshot.compare_to(first[0], "traceback") if stat.size_diff > 0][:6]
        pymalloc = _pymalloc_stats()
        info = libc.mallinfo2()
        record = {
            **pymalloc,
            "objects": len(gc.get_objects()),
            "unreachable": unreachable,
            "garbage": before - pymalloc["pymalloc_in_use"] if before >= 0 else -1,
            "malloc_in_use": info.uordblks + info.hblkhd,
            "malloc_free_kept": info.fordblks,
            "grown": [
                f"{stat.size_diff / 1024:+,.0f} KiB, {stat.count_diff:+d} blocks: "
                + " <- ".join(line.strip() for line in reversed(stat.traceback.format()) if line.startswith("  File"))
                for stat in grown
            ],
        }
        with open(probe_file, "a") as out:
            out.write(json.dumps(record) + "\n")

    signal.signal(signal.SIGUSR1, report)
    argv = _platform_script().web_argv()
    uvicorn.main.main(args=argv[3:])  # what follows `python -m uvicorn`


def _pymalloc_stats() -> dict[str, int]:
    """pymalloc's arenas and bytes in use, from `sys._debugmallocstats()` (which writes to fd 2)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as out:
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")

    def figure(label: str) -> int:
        found = re.search(rf"^# {label}\s*=\s*([\d,]+)", text, re.MULTILINE)
        return int(found.group(1).replace(",", "")) if found else -1

    return {
        "pymalloc_arenas": figure("arenas allocated current"),
        "pymalloc_arenas_highwater": figure("arenas highwater mark"),
        "pymalloc_in_use": figure("bytes in allocated blocks"),
    }


def _start_probe_server(platform, env: dict, log_dir: Path, probe_file: Path, *, trace: bool):
    """`_serve` on a free port, waited for as `start_web` waits for the real one."""
    import httpx

    from iot.testing.processes import ManagedProcess, free_port, wait_until

    port = free_port()
    metrics_dir = Path(tempfile.mkdtemp(prefix="iot-prom-", dir=log_dir))
    env = {**env, "PORT": str(port), "WEB_CONCURRENCY": "1", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    argv = [sys.executable, __file__, "--serve", str(probe_file), *(["--tracemalloc"] if trace else [])]
    with open(log_dir / "web.log", "wb") as log:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    managed = ManagedProcess(name="web", process=process, log_path=log_dir / "web.log")
    platform.processes.append(managed)
    platform.base_url = f"http://127.0.0.1:{port}"

    def live() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"probe server exited:\n{managed.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{platform.base_url}/health/live", timeout=1.0).status_code == 200
        return False

    wait_until(live, timeout=60, interval=0.2, message="probe server live")
    return managed


def _ask_probe(pid: int, probe_file: Path, index: int) -> dict:
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = probe_file.read_text().splitlines() if probe_file.exists() else []
        if len(lines) > index:
            return json.loads(lines[index])
        time.sleep(0.2)
    raise RuntimeError("the server wrote no memory report")


# --- the driver ---------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    points: int
    rss: int
    heap: int
    anon: int
    cpu_ms_per_request: float  # the web process's user + system CPU since the previous checkpoint
    system_ms_per_request: float  # of which system (page faults, mmap/munmap, I/O)
    probe: dict = field(default_factory=dict)


def smaps_rss(pid: int) -> tuple[int, int]:
    """(`[heap]`, anonymous) resident bytes of process `pid`."""
    heap = anon = 0
    name = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                name = parts[5].strip() if len(parts) > 5 else ""
            elif line.startswith("Rss:"):
                size = int(line.split()[1]) * 1024
                if name == "[heap]":
                    heap += size
                elif name == "":
                    anon += size
    return heap, anon


def wrk(url: str, *, seconds: int, env: dict[str, str]) -> tuple[int, int, float]:
    """(requests answered 2xx, other answers and socket errors, wall seconds) of one wrk run."""
    argv = ["wrk", "-t", "2", "-c", str(CONNECTIONS), "-d", f"{seconds}s", "--timeout", "20s"]
    argv += ["-s", str(BENCH_DIR / "wrk" / "batch.lua"), url]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, check=True).stdout
    wall = time.monotonic() - started
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return total - errors, errors, wall


class Driver:
    """Loads one web process to each checkpoint in turn."""

    def __init__(self, *, token: str, devices: list[str], redis_client: redis.Redis, prefix: str, log_dir: Path):
        self.token, self.devices = token, devices
        self.redis, self.prefix = redis_client, prefix
        self.log_dir = log_dir

    def drive(self, url: str, pid: int, checkpoints: list[int], probe_file: Path | None) -> list[Checkpoint]:
        process = psutil.Process(pid)
        results: list[Checkpoint] = []
        accepted, rate = 0, None
        wrk_env = {"BENCH_TOKEN": self.token, "BENCH_DEVICES": ",".join(self.devices), "BENCH_BATCH_SIZE": str(BATCH)}
        for target in checkpoints:
            cpu_before, points_before = process.cpu_times(), accepted
            while accepted < target:
                # The first load (1 s) measures the rate that sizes the next ones.
                seconds = 1 if rate is None else int(min(60, max(1, (target - accepted) / rate * 0.95 + 0.5)))
                # A new base second per load, 20 minutes back: no timestamp repeats, all inside the window.
                epoch = str(int(time.time()) - 1200)
                ok, errors, wall = wrk(url, seconds=seconds, env={**wrk_env, "BENCH_BASE_EPOCH": epoch})
                if errors:
                    print(f"    ({errors} requests failed: see {self.log_dir}/web.log)", flush=True)
                if not ok:
                    raise RuntimeError(f"no request accepted: see {self.log_dir}/web.log")
                accepted += ok * BATCH
                rate = max(ok * BATCH / wall, 500.0)
                event_queue_empty(self.redis, self.prefix)
            requests, cpu = (accepted - points_before) / BATCH, process.cpu_times()
            user, system = cpu.user - cpu_before.user, cpu.system - cpu_before.system
            per_request = [seconds * 1000 / requests if requests else 0.0 for seconds in (user + system, system)]
            checkpoint = Checkpoint(accepted, process.memory_info().rss, *smaps_rss(pid), *per_request)
            if probe_file is not None:
                checkpoint.probe = _ask_probe(pid, probe_file, len(results))
            results.append(checkpoint)
            report(checkpoint)
        return results


def report(c: Checkpoint) -> None:
    cpu = f", CPU per request {c.cpu_ms_per_request:.1f} ms (system {c.system_ms_per_request:.1f})" if c.points else ""
    print(
        f"    {c.points:>10,} points: RSS {c.rss / 2**20:6.1f} MiB ([heap] {c.heap / 2**20:5.1f}, anon "
        f"{c.anon / 2**20:5.1f}){cpu}",
        flush=True,
    )
    if c.probe:
        p, mib = c.probe, 2**20
        print(
            f"      gc: {p['objects']:,} objects tracked; a full collection then freed {p['unreachable']:,} "
            f"unreachable, {p['garbage'] / mib:.1f} MiB\n"
            f"      pymalloc: {p['pymalloc_arenas']} arenas of 1 MiB (high-water {p['pymalloc_arenas_highwater']}), "
            f"{p['pymalloc_in_use'] / mib:.1f} MiB in use; glibc: {p['malloc_in_use'] / mib:.1f} MiB in use, "
            f"{p['malloc_free_kept'] / mib:.1f} MiB free kept",
            flush=True,
        )
        for line in p["grown"]:
            print(f"        {line}")


def event_queue_empty(client: redis.Redis, prefix: str) -> None:
    """Drop what the loads published (no consumer runs here) so Redis stays small."""
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        if client.type(key) == b"stream":
            client.xtrim(key, maxlen=0)


def variant_env(name: str) -> dict[str, str]:
    """The MALLOC_ARENA_MAX a variant gives the web process."""
    if name == "platform":
        # Through `scripts/platform.py web` it sets this itself; `--probe` bypasses it, so it is given here.
        script = _platform_script()
        return script.malloc_environment() if hasattr(script, "malloc_environment") else {}
    if name == "glibc":
        return {"MALLOC_ARENA_MAX": str(8 * len(os.sched_getaffinity(0)))}  # glibc's own limit on 64-bit
    if name.startswith("arenas="):
        return {"MALLOC_ARENA_MAX": str(int(name.removeprefix("arenas=")))}
    raise SystemExit(f"unknown variant {name!r}: platform, glibc or arenas=N")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="glibc,platform", help="comma-separated: platform, glibc, arenas=N")
    parser.add_argument("--checkpoints", default=DEFAULT_CHECKPOINTS, help="points accepted, comma-separated")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--web-threads", type=int, help="WEB_THREADS (default: the platform's)")
    parser.add_argument("--probe", action="store_true", help="the server's gc, pymalloc and glibc figures")
    parser.add_argument("--tracemalloc", action="store_true", help="--probe plus where Python memory grew")
    parser.add_argument("--database", default="iot_bench_web_rss", help="name of the (recreated) database")
    parser.add_argument("--redis-prefix", default="iotbench-webrss")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: the --probe server, reporting to this file
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, trace=args.tracemalloc)
        return 0

    from _harness import UNLIMITED_ENV, api_token, fresh_database
    from suite import register_devices

    from iot.testing.processes import Platform, platform_env, start_web

    checkpoints = sorted(int(n) for n in args.checkpoints.split(","))
    variants = [(name, variant_env(name)) for name in args.variants.split(",")]
    database = fresh_database(args.database)
    token = api_token(database)
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    base_env = platform_env(
        database=database,
        extra={
            "DJANGO_SETTINGS_MODULE": "iot.settings",
            "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "bench-only-secret-key"),
            "REDIS_KEY_PREFIX": args.redis_prefix,
            "LOG_LEVEL": "WARNING",
            **UNLIMITED_ENV,
            **({"WEB_THREADS": str(args.web_threads)} if args.web_threads else {}),
        },
    )
    base_env.pop("MALLOC_ARENA_MAX", None)  # each variant gives its own
    probing = args.probe or args.tracemalloc
    devices: list[str] = []
    summary = []
    for name, env in variants:
        platform = Platform(env={**base_env, **env})
        log_dir = Path(tempfile.mkdtemp(prefix="iot-web-rss-"))
        probe_file = log_dir / "probe.jsonl" if probing else None
        try:
            if probe_file is not None:
                managed = _start_probe_server(platform, platform.env, log_dir, probe_file, trace=args.tracemalloc)
            else:
                managed = start_web(platform, workers=1, log_dir=log_dir)
            pid = managed.process.pid  # `platform.py web` execs uvicorn, which serves in-process with 1 worker
            served = _environ_of(pid)
            arena_max = served.get("MALLOC_ARENA_MAX", f"unset: glibc's {8 * len(os.sched_getaffinity(pid))}")
            print(
                f"\n{name}: one web process (pid {pid}), MALLOC_ARENA_MAX={arena_max}, "
                f"WEB_THREADS={served.get('WEB_THREADS', 'default')}, {BATCH}-point batches, {CONNECTIONS} "
                f"connections{', tracemalloc on' if args.tracemalloc else ''}; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            devices = devices or register_devices(platform.base_url, token, args.devices)
            driver = Driver(
                token=token, devices=devices, redis_client=client, prefix=args.redis_prefix, log_dir=log_dir
            )
            summary.append(
                (name, arena_max, driver.drive(platform.base_url + "/telemetry/batch", pid, checkpoints, probe_file))
            )
        finally:
            platform.stop()
            with contextlib.suppress(redis.RedisError):
                event_queue_empty(client, args.redis_prefix)

    print(f"\nweb RSS (MiB, one process) by points accepted ({BATCH}-point batches, {CONNECTIONS} connections):")
    # Growth as the suite's memory row counts it: from the first checkpoint past 100 000 points.
    base = next((i for i, n in enumerate(checkpoints) if n >= 100_000), 0)
    columns = "".join(f"{n:>11,}" for n in checkpoints)
    print(f"  {'MALLOC_ARENA_MAX':<28}{columns}   growth {checkpoints[base]:,} -> {checkpoints[-1]:,}   CPU/request")
    for name, arena_max, results in summary:
        figures = "".join(f"{c.rss / 2**20:>11.1f}" for c in results)
        growth = (results[-1].rss - results[base].rss) / results[base].rss * 100
        cpu = sorted(c.cpu_ms_per_request for c in results if c.points)
        print(f"  {f'{arena_max} ({name})':<28}{figures}   {growth:+.1f}%   {cpu[len(cpu) // 2]:.1f} ms (median)")
    return 0


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


if __name__ == "__main__":
    sys.exit(main())
