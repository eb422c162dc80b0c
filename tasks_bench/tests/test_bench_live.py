"""The benchmark on the real repository, in CI's quick form, so that it cannot rot unnoticed.

`verify --task 01 --repeat 1` runs task 01's graders against a copy of this working tree and against a
copy with its bug.patch applied (a live platform each, on databases of their own): the patch must still
apply and the graders still tell the two apart. `make bench-tasks` does the same for every task, 3 times.
The export is played as Terminal-Bench would, without Docker: bug applied to the exported repository,
solution.sh, run-tests.sh.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from iot.testing.processes import database_url
from tasks_bench.catalog import TASKS_DIR, tasks_discover, tasks_select
from tasks_bench.export import task_export

pytestmark = pytest.mark.live

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK_TASK = "01"


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DATABASE_URL": database_url(connection.settings_dict), **extra}
    env["DJANGO_SETTINGS_MODULE"] = "iot.settings_test"
    return env


def test_verify_quick_form_finds_the_quick_task_valid(tmp_path):
    report_path = tmp_path / "verify.json"
    command = [
        sys.executable,
        str(REPO_ROOT / "manage.py"),
        "tasks_bench",
        "verify",
        "--task",
        QUICK_TASK,
        "--repeat",
        "1",
        "--json",
        str(report_path),
    ]
    env = child_env(REDIS_KEY_PREFIX=f"{settings.REDIS_KEY_PREFIX}-bench")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    report = json.loads(report_path.read_text())
    (task,) = report["tasks"]
    assert task["verdict"] == "valid", task["reason"]
    assert task["fail_to_pass"] and task["pass_to_pass"]
    assert [run["status"] for run in task["phases"]["clean"] + task["phases"]["buggy"]] == ["ok", "ok"]
    assert report["summary"]["all_valid"] is True
    assert report["environment"]["django"] and report["environment"]["requirements_sha256"]


def test_exported_task_is_fixed_by_its_solution_as_its_graders_see_it(tmp_path):
    task = tasks_select(tasks_discover(REPO_ROOT / TASKS_DIR), [QUICK_TASK])[0]
    task_dir = task_export(repo_root=REPO_ROOT, task=task, directory=tmp_path / "export")
    app = tmp_path / "app"
    subprocess.run(["cp", "-R", str(task_dir / "repo"), str(app)], check=True)
    # What the Dockerfile does, then what Terminal-Bench's harness does after the agent: the reference
    # solution, then the graders.
    subprocess.run(["patch", "-p1", "--batch", "-i", str(task_dir / "bug.patch")], cwd=app, check=True)
    env = child_env(
        APP_DIR=str(app),
        PYTHON=sys.executable,
        REDIS_KEY_PREFIX=f"{settings.REDIS_KEY_PREFIX}-export",
    )
    env["DATABASE_URL"] = env["DATABASE_URL"].rsplit("/", 1)[0] + f"/tbexport_{uuid.uuid4().hex[:8]}"
    env.pop("DJANGO_SETTINGS_MODULE")  # run-tests.sh runs pytest, which reads it from pyproject.toml
    env.pop("TEST_DIR", None)
    solved = subprocess.run(["bash", str(task_dir / "solution.sh")], env=env, capture_output=True, text=True)
    assert solved.returncode == 0, solved.stderr
    assert (app / "devices" / "services.py").read_text() == (REPO_ROOT / "devices" / "services.py").read_text()
    graded = subprocess.run(
        ["bash", str(task_dir / "run-tests.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert graded.returncode == 0, graded.stdout[-5000:]
    assert " passed" in graded.stdout and " failed" not in graded.stdout
