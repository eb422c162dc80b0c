"""`tasks_bench export`: Terminal-Bench directories whose solution.sh really fixes the bug run-tests.sh grades.

Docker is not available here, so the container's steps are played directly: the exported repo/ is copied,
bug.patch applied as the Dockerfile applies it, then run-tests.sh (fails), solution.sh, run-tests.sh (passes).
"""

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks_bench.catalog import tasks_discover, tasks_select
from tasks_bench.export import solution_script, task_export
from tasks_bench.testing import CALC, fake_repo_create

FAKE_TASKS = Path("tasks")


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = fake_repo_create(tmp_path)
    (repo / ".venv").mkdir()  # left out of the export, like var/ and bytecode
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "calc.cpython-311.pyc").write_bytes(b"stale")
    return repo


def exported(repo: Path, out: Path, task_id: str) -> Path:
    task = tasks_select(tasks_discover(repo / FAKE_TASKS), [task_id])[0]
    return task_export(repo_root=repo, task=task, directory=out, tasks_dir=FAKE_TASKS)


def script(path: Path, app: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "APP_DIR": str(app), "PYTHON": sys.executable, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("TEST_DIR", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)


def test_an_exported_task_has_the_terminal_bench_layout_without_the_answers(repo, tmp_path):
    task_dir = exported(repo, tmp_path / "out", "01")
    assert task_dir == tmp_path / "out" / "01-valid"
    for name in ("task.yaml", "Dockerfile", "docker-compose.yaml", "run-tests.sh", "solution.sh", "bug.patch"):
        assert (task_dir / name).is_file(), name
    assert (task_dir / "tests" / "test_grader.py").is_file()
    assert os.access(task_dir / "run-tests.sh", os.X_OK) and os.access(task_dir / "solution.sh", os.X_OK)
    assert yaml.safe_load((task_dir / "task.yaml").read_text())["parser_name"] == "pytest"
    compose = yaml.safe_load((task_dir / "docker-compose.yaml").read_text())
    assert set(compose["services"]) == {"client", "postgres", "redis"}
    assert "T_BENCH_TASK_DOCKER_CLIENT_IMAGE_NAME" in compose["services"]["client"]["image"]
    assert "patch -p1" in (task_dir / "Dockerfile").read_text()
    # The image is built from repo/: the clean code, and nothing that gives the bug or the graders away.
    assert (task_dir / "repo" / "calc.py").read_text() == CALC
    assert not (task_dir / "repo" / "tasks").exists()
    assert not (task_dir / "repo" / ".venv").exists()
    assert not list((task_dir / "repo").rglob("*.pyc"))


def test_solution_sh_fixes_what_bug_patch_breaks_and_run_tests_sh_sees_it(repo, tmp_path):
    task_dir = exported(repo, tmp_path / "out", "01")
    app = tmp_path / "app"
    shutil.copytree(task_dir / "repo", app)
    # What the Dockerfile does.
    subprocess.run(["patch", "-p1", "--batch", "-i", str(task_dir / "bug.patch")], cwd=app, check=True)
    assert (app / "calc.py").read_text() != CALC

    before = script(task_dir / "run-tests.sh", app)
    assert before.returncode == 1, before.stdout
    assert "FAILED grader_tests/test_grader.py::test_add" in before.stdout

    fixed = script(task_dir / "solution.sh", app)
    assert fixed.returncode == 0, fixed.stderr
    assert (app / "calc.py").read_text() == CALC

    after = script(task_dir / "run-tests.sh", app)
    assert after.returncode == 0, after.stdout
    assert "2 passed" in after.stdout


def test_a_task_whose_patch_does_not_apply_is_not_exported(repo, tmp_path):
    with pytest.raises(ValueError, match="02-stale-patch: bug.patch does not apply"):
        exported(repo, tmp_path / "out", "02")
    assert not (tmp_path / "out" / "02-stale-patch").exists()


def test_solution_script_restores_every_kind_of_change_byte_for_byte(tmp_path):
    clean = {
        "text.py": b"x = 1\n",
        "no_newline.txt": b"last line",
        "binary.bin": bytes(range(256)),
        "deleted/by_bug.py": b"kept = True\n",
        "same.py": b"untouched\n",
    }
    buggy = {
        "text.py": b"x = 2\n",
        "no_newline.txt": b"changed",
        "binary.bin": b"\x00",
        "same.py": b"untouched\n",
        "added/by_bug.py": b"bug = True\n",
    }
    text = solution_script(task_id="99-x", clean=clean, buggy=buggy)
    assert "same.py" not in text
    assert base64.b64encode(bytes(range(256))).decode() in text
    app = tmp_path / "app"
    for path, content in buggy.items():
        (app / path).parent.mkdir(parents=True, exist_ok=True)
        (app / path).write_bytes(content)
    (tmp_path / "solution.sh").write_text(text)
    assert script(tmp_path / "solution.sh", app).returncode == 0
    restored = {path.relative_to(app).as_posix(): path.read_bytes() for path in app.rglob("*") if path.is_file()}
    assert restored == clean
