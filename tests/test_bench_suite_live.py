"""`bench/suite.py --smoke` (what `make bench` runs, every measure for ~1 s) still runs and prints its table.

Figures are not checked (seconds of load on a shared machine mean nothing); what is: the suite
starts the real platform and the FastAPI + asyncpg yardstick, drives every measure with wrk, and
prints every row of the table. Two invariants come along for free: the shared serial number
registered by half the requests of a run is one device, and no event the yardstick publishes
into the platform's queue is dead-lettered by the consumers (same format as the platform's).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from iot.testing.processes import database_url

pytestmark = pytest.mark.live

REPO_ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    "GET /health/live, 64 conns (ceiling)",
    "single points, 64 conns ÷ /health/live",
    "100-point batches, 64 conns ÷ COPY",
    "1000-point batches, 16 conns ÷ COPY",
    "single point, 4 conns: p99",
    "registrations (half one serial), 64 conns ÷ /health/live",
    "single points ÷ FastAPI + asyncpg, 64 conns",
    "web RSS growth",
]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk; .ci/run does)")
def test_smoke_mode_runs_every_measure_and_prints_the_table():
    env = {
        **os.environ,
        # The suite recreates its own database on the test database's server, in the session's Redis namespace.
        "DATABASE_URL": database_url(connection.settings_dict),
        "REDIS_URL": settings.REDIS_URL,
    }
    argv = [
        sys.executable,
        str(REPO_ROOT / "bench" / "suite.py"),
        "--smoke",
        "--database",
        f"{connection.settings_dict['NAME']}_suite_smoke",
        "--redis-prefix",
        f"{settings.REDIS_KEY_PREFIX}:suite-smoke",
    ]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "measure", output[-5000:]
    for row in ROWS:
        assert any(line.startswith(f"| {row}") for line in table), f"no row {row!r}:\n{done.stdout[-5000:]}"
    assert "devices for the shared serial: 1;" in done.stdout
    assert "dead-lettered events: 0;" in done.stdout
