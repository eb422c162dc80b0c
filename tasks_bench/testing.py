"""The benchmark's part of the test kit: a tiny fake repository whose tasks exercise every verdict.

`fake_repo_create(root)` writes a repository of one module (`calc.py`) and tasks under `tasks/`, each a
complete task directory (task.yaml, CHANGES.md, bug.patch, tests/test_grader.py) whose graders need
no server, so the runner's rules can be checked in seconds:

- `01-valid`: the bug breaks `add`; one grader fails on it, one passes on both;
- `02-stale-patch`: its patch's context is not in calc.py any more;
- `03-breaks-collection`: its bug is a syntax error, so the graders do not even import;
- `04-flaky`: one grader passes on odd runs and fails on even ones (a counter file outside the copies);
- `05-slow`: its grader outlives `max_test_timeout_sec` (2 s), with a child in a session of its own that
  writes its pid to `pids/` (as the live platform's servers do): the runner must kill the whole tree;
- `06-undetected`: its bug changes a function no grader calls;
- `07-crashes-on-bug`: its bug raises a KeyError, so the grader errors out instead of failing an assertion;
- `08-no-changes`: no CHANGES.md (a broken layout);
- `09-skips`: a grader that skips on the clean code.
"""

import difflib
from pathlib import Path

import yaml

CALC = """\
def add(a, b):
    return a + b


def mul(a, b):
    return a * b


def unused(a):
    return a
"""

TASK_SPEC = {
    "instruction": "Fix calc.\n",
    "difficulty": "easy",
    "category": "testing",
    "tags": ["fake"],
    "parser_name": "pytest",
    "max_agent_timeout_sec": 60,
    "max_test_timeout_sec": 60,
}

GRADER = """\
from calc import add, mul


def test_add():
    assert add(2, 3) == 5


def test_mul():
    assert mul(2, 3) == 6
"""

FLAKY_GRADER = """\
from pathlib import Path

from calc import add

COUNTER = Path({counter!r})


def test_add():
    assert add(2, 3) == 5


def test_alternates():
    runs = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
    COUNTER.write_text(str(runs))
    assert runs % 2 == 1, f"run {{runs}}"
"""

SLOW_GRADER = """\
import subprocess
import sys
import time
from pathlib import Path

PIDS = Path({pids!r})


def test_hangs():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    PIDS.mkdir(exist_ok=True)
    (PIDS / str(child.pid)).touch()
    time.sleep(300)
"""

SKIP_GRADER = """\
import pytest

from calc import add


def test_add():
    assert add(2, 3) == 5


def test_not_yet():
    pytest.skip("not written yet")
"""


def unified_diff(path: str, before: str, after: str) -> str:
    """A patch that turns `before` into `after` in `path`, as `git apply` / `patch -p1` read it."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), fromfile=f"a/{path}", tofile=f"b/{path}"
    )
    return "".join(lines)


def fake_task_write(
    tasks_dir: Path, task_id: str, *, patch: str, grader: str, spec: dict | None = None, changes: bool = True
) -> Path:
    path = tasks_dir / task_id
    (path / "tests").mkdir(parents=True)
    (path / "task.yaml").write_text(yaml.safe_dump({**TASK_SPEC, **(spec or {})}, sort_keys=False))
    if changes:
        (path / "CHANGES.md").write_text(f"# {task_id}\n")
    (path / "bug.patch").write_text(patch)
    (path / "tests" / "test_grader.py").write_text(grader)
    return path


def fake_repo_create(root: Path) -> Path:
    """The fake repository (see the module docstring) at `root/repo`; state files of the graders go in `root`."""
    repo = root / "repo"
    tasks = repo / "tasks"
    tasks.mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "-p no:cacheprovider"\n')
    broken_add = unified_diff("calc.py", CALC, CALC.replace("return a + b", "return a - b"))
    fake_task_write(tasks, "01-valid", patch=broken_add, grader=GRADER)
    stale = unified_diff("calc.py", CALC.replace("a + b", "a + b + 0"), CALC.replace("a + b", "a - b"))
    fake_task_write(tasks, "02-stale-patch", patch=stale, grader=GRADER)
    syntax = unified_diff("calc.py", CALC, CALC.replace("def mul(a, b):", "def mul(a, b)"))
    fake_task_write(tasks, "03-breaks-collection", patch=syntax, grader=GRADER)
    fake_task_write(
        tasks, "04-flaky", patch=broken_add, grader=FLAKY_GRADER.format(counter=str(root / "flaky-counter"))
    )
    fake_task_write(
        tasks,
        "05-slow",
        patch=broken_add,
        grader=SLOW_GRADER.format(pids=str(root / "pids")),
        spec={"max_test_timeout_sec": 2},
    )
    unused = unified_diff("calc.py", CALC, CALC.replace("return a\n", "return -a\n"))
    fake_task_write(tasks, "06-undetected", patch=unused, grader=GRADER)
    crash = unified_diff("calc.py", CALC, CALC.replace("return a + b", "return {}[a]"))
    fake_task_write(tasks, "07-crashes-on-bug", patch=crash, grader=GRADER)
    fake_task_write(tasks, "08-no-changes", patch=broken_add, grader=GRADER, changes=False)
    fake_task_write(tasks, "09-skips", patch=broken_add, grader=SKIP_GRADER)
    return repo
