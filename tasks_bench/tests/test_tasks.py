"""Every task of the benchmark keeps its shape, and its bug.patch still applies to the working tree.

The cheap half of `verify` for all the tasks at once (a second or so each), so that a change that makes
a task's patch stale fails CI at once, and not only the next `make bench-tasks`: a patch is a diff
against the code, and the code moves.
"""

import ast
from pathlib import Path

import pytest

from tasks_bench.catalog import TASKS_DIR, tasks_discover
from tasks_bench.runner import patch_apply, repo_copy

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = tasks_discover(REPO_ROOT / TASKS_DIR)
# Graders see the platform as clients do: they may use the test kit (iot.testing: live platforms, request
# bodies), never the code they grade.
APPLICATION = {"devices", "telemetry", "firmware", "alerts", "analytics", "mqtt", "tasks_bench"}


def test_the_benchmark_has_its_tasks_numbered_from_01():
    numbers = [task.id[:2] for task in TASKS]
    assert numbers and numbers == [f"{n:02d}" for n in range(1, len(numbers) + 1)], numbers


@pytest.mark.parametrize("task", TASKS, ids=[task.id for task in TASKS])
def test_task_follows_the_layout(task):
    assert task.problem is None
    assert task.spec["max_test_timeout_sec"] >= 60


@pytest.mark.parametrize("task", TASKS, ids=[task.id for task in TASKS])
def test_bug_patch_applies_to_the_working_tree(task, tmp_path):
    copy = repo_copy(source=REPO_ROOT, dest=tmp_path / "copy")
    applied, said = patch_apply(copy=copy, patch=task.patch_path)
    assert applied, said


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("task", TASKS, ids=[task.id for task in TASKS])
def test_graders_import_no_application_code(task):
    offenders = {}
    for path in sorted(task.tests_dir.glob("*.py")):
        bad = sorted(
            name
            for name in _imported(path)
            if name.split(".")[0] in APPLICATION or (name.split(".")[0] == "iot" and not name.startswith("iot.testing"))
        )
        if bad:
            offenders[path.name] = bad
    assert offenders == {}, "graders talk to the platform over HTTP; the test kit (iot.testing) is allowed"
