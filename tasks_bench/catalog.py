"""The benchmark's tasks as files: `tasks_bench/tasks/<NN>-<slug>/`, one directory per seed scenario.

A task directory holds exactly what a Terminal-Bench task needs besides its container:

- `task.yaml`: the statement and limits, with exactly the keys of `TASK_KEYS` (`instruction`,
  `difficulty`, `category`, `tags`, `parser_name: pytest`, `max_agent_timeout_sec`,
  `max_test_timeout_sec`); the directory name is the task's id;
- `CHANGES.md`: the root cause and the bug pattern;
- `bug.patch`: a unified diff against the current code that puts the bug back (a patch, not
  whole files, so later improvements elsewhere in the same files are never silently reverted);
- `tests/test_grader.py` (and a `conftest.py` of fixtures): grader tests over HTTP against a live
  platform started from the code under test.

A directory that breaks these rules still loads, with `problem` saying what is wrong, so the
verifier reports it as an invalid task instead of stopping.
"""

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASK_KEYS = (
    "instruction",
    "difficulty",
    "category",
    "tags",
    "parser_name",
    "max_agent_timeout_sec",
    "max_test_timeout_sec",
)
TASK_FILES = ("task.yaml", "CHANGES.md", "bug.patch", "tests/test_grader.py")
DIFFICULTIES = ("easy", "medium", "hard")
TASK_ID = re.compile(r"^(?P<number>\d{2})-[a-z0-9]+(?:-[a-z0-9]+)*$")

# Where the tasks live, relative to the repository root.
TASKS_DIR = Path("tasks_bench") / "tasks"


@dataclass(frozen=True)
class Task:
    """One task directory; `problem` is None when it follows the layout, else why it does not."""

    id: str
    path: Path
    spec: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def category(self) -> str:
        return str(self.spec.get("category", ""))

    @property
    def max_test_timeout_sec(self) -> float:
        return float(self.spec.get("max_test_timeout_sec") or 0)

    @property
    def tests_dir(self) -> Path:
        return self.path / "tests"

    @property
    def patch_path(self) -> Path:
        return self.path / "bug.patch"

    def patch_sha256(self) -> str | None:
        try:
            return hashlib.sha256(self.patch_path.read_bytes()).hexdigest()
        except OSError:
            return None


def _spec_problem(spec: Any) -> str | None:
    """What is wrong with a parsed task.yaml, or None."""
    if not isinstance(spec, dict):
        return "task.yaml is not a mapping"
    keys = set(spec)
    missing = [key for key in TASK_KEYS if key not in keys]
    extra = sorted(keys - set(TASK_KEYS))
    if missing or extra:
        return f"task.yaml keys must be exactly {', '.join(TASK_KEYS)} (missing: {missing}, unexpected: {extra})"
    if not isinstance(spec["instruction"], str) or not spec["instruction"].strip():
        return "task.yaml: instruction must be a non-empty string"
    if spec["difficulty"] not in DIFFICULTIES:
        return f"task.yaml: difficulty must be one of {', '.join(DIFFICULTIES)}"
    if not isinstance(spec["category"], str) or not spec["category"]:
        return "task.yaml: category must be a non-empty string"
    if not isinstance(spec["tags"], list) or not all(isinstance(tag, str) and tag for tag in spec["tags"]):
        return "task.yaml: tags must be a list of strings"
    if spec["parser_name"] != "pytest":
        return "task.yaml: parser_name must be pytest"
    for key in ("max_agent_timeout_sec", "max_test_timeout_sec"):
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            return f"task.yaml: {key} must be a positive number of seconds"
    return None


def task_load(path: Path) -> Task:
    """The task in directory `path` (its name is the id), with `problem` set if it breaks the layout."""
    task_id = path.name
    if not TASK_ID.match(task_id):
        return Task(id=task_id, path=path, problem=f"the directory name {task_id!r} is not <NN>-<slug>")
    missing = [name for name in TASK_FILES if not (path / name).is_file()]
    spec: Any = {}
    try:
        spec = yaml.safe_load((path / "task.yaml").read_text()) if (path / "task.yaml").is_file() else {}
    except yaml.YAMLError as exc:
        return Task(id=task_id, path=path, problem=f"task.yaml does not parse: {exc}")
    if missing:
        return Task(id=task_id, path=path, spec=spec if isinstance(spec, dict) else {}, problem=f"missing {missing}")
    problem = _spec_problem(spec)
    return Task(id=task_id, path=path, spec=spec if isinstance(spec, dict) else {}, problem=problem)


def tasks_discover(tasks_dir: Path) -> list[Task]:
    """Every task directory under `tasks_dir`, in id order (hidden and `__pycache__` directories skipped)."""
    if not tasks_dir.is_dir():
        return []
    return [
        task_load(path)
        for path in sorted(tasks_dir.iterdir())
        if path.is_dir() and not path.name.startswith((".", "_"))
    ]


def _number(task: Task) -> int | None:
    match = TASK_ID.match(task.id)
    return int(match["number"]) if match else None


def tasks_select(tasks: list[Task], wanted: list[str] | None) -> list[Task]:
    """The tasks named in `wanted` (a full id, or its number: `03` or `3`), in id order; all if none given.

    Raises `KeyError` naming what matches no task.
    """
    if not wanted:
        return list(tasks)
    chosen: dict[str, Task] = {}
    unknown = []
    for name in wanted:
        matches = [task for task in tasks if task.id == name or (name.isdigit() and _number(task) == int(name))]
        if not matches:
            unknown.append(name)
        for task in matches:
            chosen[task.id] = task
    if unknown:
        raise KeyError(f"no task {', '.join(unknown)} (known: {', '.join(task.id for task in tasks)})")
    return [chosen[task_id] for task_id in sorted(chosen)]
