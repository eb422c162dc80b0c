"""`tasks_bench export DIR`: each task as a Terminal-Bench task directory.

    DIR/<id>/
        task.yaml            the task's, as is
        Dockerfile           the repository (repo/) with bug.patch applied, its requirements installed
        docker-compose.yaml  the client container (Terminal-Bench's T_BENCH_* variables) + Postgres + Redis
        repo/                the working tree, clean (the benchmark's own tasks left out: they hold the answers)
        bug.patch            applied by the Dockerfile, then deleted from the image
        run-tests.sh         copies tests/ into the repository and runs them with pytest
        solution.sh          writes back the correct version of every file the bug changed (and deletes the
                             files it added)
        tests/               the graders (test_grader.py, conftest.py)

The scripts take `APP_DIR` (the repository, default /app), `TEST_DIR` (default: tests/ next to
run-tests.sh; Terminal-Bench sets it) and `PYTHON` (default python), so they also run outside a
container: apply the bug to a copy of repo/, then run solution.sh and run-tests.sh against it.
"""

import base64
import hashlib
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from tasks_bench.catalog import TASKS_DIR, Task
from tasks_bench.runner import COPY_IGNORED, patch_apply, repo_copy

GRADER_DIR = "grader_tests"

DOCKERFILE = """\
# The repository with the task's bug applied; the agent works in /app.
FROM python:3.11-slim-bookworm
RUN apt-get update \\
    && apt-get install -y --no-install-recommends git patch tmux asciinema curl \\
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY repo/requirements.txt repo/requirements-dev.txt /app/
RUN pip install --no-cache-dir -r requirements-dev.txt
COPY repo/ /app/
COPY bug.patch /tmp/bug.patch
RUN patch -p1 --batch < /tmp/bug.patch && rm /tmp/bug.patch \\
    && find /app -name __pycache__ -type d -prune -exec rm -rf {{}} +
ENV PYTHONUNBUFFERED=1 \\
    DATABASE_URL=postgres://postgres@postgres:5432/iot \\
    REDIS_URL=redis://redis:6379/0 \\
    REDIS_KEY_PREFIX=tbench-{task_id}
"""

COMPOSE = """\
services:
  client:
    build:
      context: .
      dockerfile: Dockerfile
    image: ${{T_BENCH_TASK_DOCKER_CLIENT_IMAGE_NAME:-iot-tbench-{task_id}}}
    container_name: ${{T_BENCH_TASK_DOCKER_CLIENT_CONTAINER_NAME:-iot-tbench-{task_id}}}
    command: ["sh", "-c", "sleep infinity"]
    environment:
      - TEST_DIR=${{T_BENCH_TEST_DIR:-/tests}}
      - DATABASE_URL=postgres://postgres@postgres:5432/iot
      - REDIS_URL=redis://redis:6379/0
    volumes:
      - ${{T_BENCH_TASK_LOGS_PATH:-./logs}}:${{T_BENCH_CONTAINER_LOGS_PATH:-/logs}}
      - ${{T_BENCH_TASK_AGENT_LOGS_PATH:-./agent-logs}}:${{T_BENCH_CONTAINER_AGENT_LOGS_PATH:-/agent-logs}}
    depends_on:
      postgres:
        condition: service_healthy
      redis:
        condition: service_started
  postgres:
    image: postgres:16
    environment:
      POSTGRES_HOST_AUTH_METHOD: trust
      POSTGRES_DB: iot
    healthcheck:
      test: ["CMD", "pg_isready", "-U", "postgres"]
      interval: 2s
      retries: 30
  redis:
    # The platform's requirements: an append-only file, and noeviction (docs/ARCHITECTURE.md).
    image: redis:7
    command: ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
"""

RUN_TESTS = """\
#!/usr/bin/env bash
# The graders of task {task_id}: copied into the repository (its conftest.py starts the live platform
# they talk to over HTTP) and run with pytest. APP_DIR: the repository (default /app); TEST_DIR: the
# graders (Terminal-Bench sets it; default tests/ next to this script); PYTHON: the interpreter.
set -euo pipefail
APP_DIR="${{APP_DIR:-/app}}"
TEST_DIR="${{TEST_DIR:-$(cd "$(dirname "$0")" && pwd)/tests}}"
PYTHON="${{PYTHON:-python}}"
cd "$APP_DIR"
rm -rf {grader_dir}
mkdir -p {grader_dir}
cp -R "$TEST_DIR"/. {grader_dir}/
# No bytecode from before the fix, and none written now.
export PYTHONDONTWRITEBYTECODE=1
find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {{}} +
exec "$PYTHON" -m pytest {grader_dir} -p no:cacheprovider -rA "$@"
"""

SOLUTION_HEAD = """\
#!/usr/bin/env bash
# The fix for task {task_id}: the correct version of every file its bug changed, written back into
# APP_DIR (default /app); files the bug added are deleted.
set -euo pipefail
APP_DIR="${{APP_DIR:-/app}}"
cd "$APP_DIR"
"""


def _tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` (relative POSIX path -> content), symlinked directories not followed."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if not (Path(dirpath) / name).is_symlink()]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def solution_script(*, task_id: str, clean: dict[str, bytes], buggy: dict[str, bytes]) -> str:
    """solution.sh: restores `clean` wherever `buggy` differs from it (heredocs for text, base64 otherwise)."""
    lines = [SOLUTION_HEAD.format(task_id=task_id)]
    for path in sorted(set(clean) | set(buggy)):
        if clean.get(path) == buggy.get(path):
            continue
        quoted = shlex.quote(path)
        if path not in clean:
            lines.append(f"rm -f {quoted}\n")
            continue
        content = clean[path]
        parent = os.path.dirname(path)
        if parent:
            lines.append(f"mkdir -p {shlex.quote(parent)}\n")
        marker = f"TBENCH_EOF_{hashlib.sha256(content).hexdigest()[:12]}"
        try:
            text = content.decode()
        except UnicodeDecodeError:
            text = None
        if text is not None and text.endswith("\n") and marker not in text:
            lines.append(f"cat > {quoted} <<'{marker}'\n{text}{marker}\n")
        else:
            encoded = base64.b64encode(content).decode()
            lines.append(f"base64 -d > {quoted} <<'{marker}'\n{encoded}\n{marker}\n")
    return "".join(lines)


def task_export(*, repo_root: Path, task: Task, directory: Path, tasks_dir: Path = TASKS_DIR) -> Path:
    """Write `directory/<task id>/` (replacing it); raises ValueError if the task is broken or its patch
    does not apply."""
    if task.problem:
        raise ValueError(f"{task.id}: {task.problem}")
    out = directory / task.id
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    repo = repo_copy(source=repo_root, dest=out / "repo")
    # The agent must not find the answers: no task directory (bug patches, graders, root causes) in the image.
    shutil.rmtree(repo / tasks_dir, ignore_errors=True)
    venv = repo / ".venv"
    if venv.is_symlink():
        venv.unlink()
    with tempfile.TemporaryDirectory(prefix="tasks-bench-export-") as scratch:
        buggy_copy = Path(scratch) / "buggy"
        shutil.copytree(repo, buggy_copy, symlinks=True)
        applied, said = patch_apply(copy=buggy_copy, patch=task.patch_path)
        if not applied:
            shutil.rmtree(out)
            raise ValueError(f"{task.id}: bug.patch does not apply: {said}")
        solution = solution_script(task_id=task.id, clean=_tree_files(repo), buggy=_tree_files(buggy_copy))
    shutil.copy2(task.path / "task.yaml", out / "task.yaml")
    shutil.copy2(task.patch_path, out / "bug.patch")
    shutil.copytree(task.tests_dir, out / "tests", ignore=shutil.ignore_patterns(*COPY_IGNORED))
    (out / "Dockerfile").write_text(DOCKERFILE.format(task_id=task.id))
    (out / "docker-compose.yaml").write_text(COMPOSE.format(task_id=task.id))
    for name, content in (
        ("run-tests.sh", RUN_TESTS.format(task_id=task.id, grader_dir=GRADER_DIR)),
        ("solution.sh", solution),
    ):
        (out / name).write_text(content)
        (out / name).chmod(0o755)
    return out


def bench_export(*, repo_root: Path, tasks: list[Task], directory: Path, tasks_dir: Path = TASKS_DIR) -> list[Path]:
    """Export every task of `tasks`; raises ValueError naming the first that cannot be exported."""
    directory.mkdir(parents=True, exist_ok=True)
    return [task_export(repo_root=repo_root, task=task, directory=directory, tasks_dir=tasks_dir) for task in tasks]
