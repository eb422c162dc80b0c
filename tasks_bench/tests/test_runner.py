"""The verifier's rules on a fake repository (`tasks_bench.testing`): one task per verdict and failure mode.

The fake graders need no server, and their pytest runs load no plugin (PYTEST_DISABLE_PLUGIN_AUTOLOAD), so
each run takes a fraction of a second.
"""

import json
import os
from pathlib import Path

import psutil
import pytest
from django.core.management import CommandError, call_command

from tasks_bench.catalog import task_load, tasks_discover, tasks_select
from tasks_bench.report import report_table
from tasks_bench.runner import (
    BenchConfig,
    _failure_outcome,
    bench_verify,
    junit_outcomes,
    run_database_url,
    task_verify,
)
from tasks_bench.testing import CALC, TASK_SPEC, fake_repo_create, fake_task_write, unified_diff

FAKE_TASKS = Path("tasks")


@pytest.fixture
def repo(tmp_path) -> Path:
    return fake_repo_create(tmp_path)


@pytest.fixture
def config(repo) -> BenchConfig:
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return BenchConfig.for_repo(repo, tasks_dir=FAKE_TASKS, env=env)


def verify(config: BenchConfig, task_id: str, repeat: int = 1):
    task = tasks_select(tasks_discover(config.repo_root / FAKE_TASKS), [task_id])[0]
    return task_verify(task=task, config=config, repeat=repeat, log=lambda line: None)


def test_a_valid_task_fails_on_its_bug_and_passes_clean_in_every_repeat(config):
    report = verify(config, "01", repeat=2)
    assert (report.verdict, report.reason) == ("valid", "")
    assert report.fail_to_pass == ["test_add"]
    assert report.pass_to_pass == ["test_mul"]
    assert report.flaky == [] and report.fail_to_fail == [] and report.pass_to_fail == []
    assert [(run.phase, run.index, run.status) for run in report.runs] == [
        ("clean", 1, "ok"),
        ("clean", 2, "ok"),
        ("buggy", 1, "ok"),
        ("buggy", 2, "ok"),
    ]
    assert report.runs[2].tests == {"test_add": "failed", "test_mul": "passed"}
    assert len(report.patch_sha256) == 64
    data = report.as_json()
    assert data["phases"]["buggy"][0]["counts"] == {"passed": 1, "failed": 1, "timeout": 0, "error": 0, "skipped": 0}
    assert set(data["durations"]) == {"clean_s", "buggy_s", "total_s"}
    json.dumps(data)


def test_the_runs_leave_the_working_tree_as_it_was(config, repo):
    verify(config, "01")
    assert (repo / "calc.py").read_text() == CALC
    assert not list(repo.rglob("__pycache__")) and not list(repo.rglob("*.pyc"))


def test_a_patch_that_no_longer_applies_makes_the_task_invalid_before_any_run(config):
    report = verify(config, "02")
    assert report.verdict == "invalid"
    assert report.reason.startswith("bug.patch does not apply: git apply")
    assert "calc.py" in report.reason
    assert report.runs == []


def test_a_bug_that_breaks_collection_is_invalid_not_detected(config):
    report = verify(config, "03")
    assert report.verdict == "invalid"
    assert "breaks the graders' collection" in report.reason
    assert [(run.phase, run.status) for run in report.runs] == [("clean", "ok"), ("buggy", "collection_error")]
    assert "SyntaxError" in report.runs[1].output_tail
    assert report.fail_to_pass == []


def test_a_grader_whose_outcome_changes_between_repeats_makes_the_task_flaky(config):
    report = verify(config, "04", repeat=2)
    assert report.verdict == "flaky"
    assert report.flaky == ["test_alternates"]
    assert "test_alternates" in report.reason
    assert report.fail_to_pass == ["test_add"]  # the stable graders are still classified


def test_a_run_past_max_test_timeout_is_reported_as_timeout_and_its_whole_tree_killed(config, tmp_path):
    report = verify(config, "05")
    assert report.verdict == "timeout"
    assert report.reason == "clean run 1 exceeded max_test_timeout_sec"
    assert [(run.phase, run.status) for run in report.runs] == [("clean", "timeout")]  # no buggy run after it
    assert report.runs[0].duration_s < 30
    pids = [int(path.name) for path in (tmp_path / "pids").iterdir()]
    assert len(pids) == 1
    # The grader's child ran in a session of its own, as the live platform's servers do: killed too.
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE


def test_a_bug_no_grader_notices_is_invalid(config):
    report = verify(config, "06")
    assert report.verdict == "invalid"
    assert report.reason == "no grader fails on the buggy code: the bug is not detected"
    assert report.pass_to_pass == ["test_add", "test_mul"]


def test_a_grader_that_errors_out_on_the_bug_instead_of_failing_an_assertion_is_invalid(config):
    report = verify(config, "07")
    assert report.verdict == "invalid"
    assert report.reason == "on the buggy code these error out instead of failing an assertion: test_add (error)"
    assert report.runs[1].tests["test_add"] == "error"
    assert report.runs[1].messages["test_add"].startswith("KeyError")


def test_a_task_directory_that_breaks_the_layout_is_reported_not_raised(config):
    report = verify(config, "08")
    assert report.verdict == "invalid"
    assert report.reason == "missing ['CHANGES.md']"


def test_a_skip_on_the_clean_code_is_not_a_pass(config):
    report = verify(config, "09")
    assert report.verdict == "invalid"
    assert report.reason == "not every grader passes on the clean code: test_not_yet (skipped)"


def test_bench_verify_reports_every_task_with_a_summary_and_the_environment(config):
    tasks = tasks_select(tasks_discover(config.repo_root / FAKE_TASKS), ["01", "02", "06"])
    report = bench_verify(tasks=tasks, config=config, repeat=1, log=lambda line: None)
    assert [task["id"] for task in report["tasks"]] == ["01-valid", "02-stale-patch", "06-undetected"]
    assert [task["verdict"] for task in report["tasks"]] == ["valid", "invalid", "invalid"]
    summary = report["summary"]
    assert (summary["total"], summary["valid"], summary["invalid"], summary["all_valid"]) == (3, 1, 2, False)
    assert {"python", "django", "pytest", "requirements_sha256"} <= set(report["environment"])
    json.dumps(report)
    table = report_table(report)
    assert "01-valid" in table and "1/3 valid" in table
    assert "1p1f x1" in table  # the buggy run of 01-valid: 1 passed, 1 failed


def test_the_command_exits_non_zero_unless_every_task_is_valid(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    out = tmp_path / "report.json"
    common = ["--repo", str(repo), "--tasks-dir", "tasks"]
    call_command("tasks_bench", *common, "verify", "--task", "01", "--repeat", "1", "--json", str(out))
    assert json.loads(out.read_text())["summary"]["all_valid"] is True
    with pytest.raises(CommandError, match="1 of 2 task"):
        call_command("tasks_bench", *common, "verify", "--task", "1", "--task", "6", "--repeat", "1", "--json", out)
    assert [task["verdict"] for task in json.loads(out.read_text())["tasks"]] == ["valid", "invalid"]
    with pytest.raises(CommandError, match="no task 42"):
        call_command("tasks_bench", *common, "verify", "--task", "42")


# --- the pieces -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "outcome"),
    [
        ("AssertionError: 4 devices for one serial number", "failed"),
        ("assert 4 == 1", "failed"),
        ("Failed: the platform never answered", "failed"),
        ("AssertionError: timed out after 60s waiting for the breaker", "failed"),
        ("httpx.ReadTimeout: timed out", "timeout"),
        ("TimeoutError", "timeout"),
        ("KeyError: 'id'", "error"),
        ("json.decoder.JSONDecodeError: Expecting value", "error"),
    ],
)
def test_a_failure_counts_as_an_assertion_a_timeout_or_an_error(message, outcome):
    assert _failure_outcome(message) == outcome


def test_junit_outcomes_read_each_kind_of_result(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.test_grader" name="test_ok" />
        <testcase classname="tests.test_grader" name="test_assert">
            <failure message="assert 1 == 2">x</failure></testcase>
        <testcase classname="tests.test_grader" name="test_setup">
            <error message="failed on setup with ...">x</error></testcase>
        <testcase classname="tests.test_grader" name="test_skip"><skipped message="later" /></testcase>
        <testcase classname="tests.test_grader.TestThing" name="test_in_class" />
        </testsuite></testsuites>"""
    )
    tests, messages, collection_error = junit_outcomes(junit)
    assert tests == {
        "test_ok": "passed",
        "test_assert": "failed",
        "test_setup": "error",
        "test_skip": "skipped",
        "TestThing::test_in_class": "passed",
    }
    assert messages["test_assert"] == "assert 1 == 2"
    assert collection_error is False
    assert junit_outcomes(tmp_path / "missing.xml") == ({}, {}, False)


def test_each_run_gets_a_database_name_of_its_own_that_fits_postgres():
    assert run_database_url("postgres://postgres@127.0.0.1:5432/iot_dev", "tb01c1ab12cd") == (
        "postgres://postgres@127.0.0.1:5432/iot_dev_tb01c1ab12cd",
        "iot_dev_tb01c1ab12cd",
    )
    # The embedded Postgres' socket form (scripts/devservices.py).
    url, name = run_database_url("postgres://postgres@:5432//work/var/test/pg/iot", "tb02b3ffffff")
    assert (url, name) == ("postgres://postgres@:5432//work/var/test/pg/iot_tb02b3ffffff", "iot_tb02b3ffffff")
    url, name = run_database_url(f"postgres://u@h/{'x' * 80}", "tb01c1ab12cd")
    assert len(f"test_{name}") <= 63 and name.endswith("_tb01c1ab12cd")


def test_task_yaml_must_have_exactly_the_benchmark_keys(tmp_path):
    patch = unified_diff("calc.py", CALC, CALC.replace("a + b", "a - b"))
    path = fake_task_write(tmp_path, "01-extra-key", patch=patch, grader="", spec={"id": "extra"})
    assert "unexpected: ['id']" in task_load(path).problem
    path = fake_task_write(tmp_path, "02-bad-parser", patch=patch, grader="", spec={"parser_name": "unittest"})
    assert task_load(path).problem == "task.yaml: parser_name must be pytest"
    path = fake_task_write(tmp_path, "03-good", patch=patch, grader="")
    assert task_load(path).problem is None and task_load(path).spec == TASK_SPEC
    path = fake_task_write(tmp_path / "x", "Task_3", patch=patch, grader="")
    assert "is not <NN>-<slug>" in task_load(path).problem


def test_tasks_are_selected_by_id_or_number(repo):
    tasks = tasks_discover(repo / FAKE_TASKS)
    assert [task.id for task in tasks_select(tasks, ["1", "04-flaky", "09"])] == ["01-valid", "04-flaky", "09-skips"]
    assert len(tasks_select(tasks, None)) == 9
    with pytest.raises(KeyError, match="no task 10, nope"):
        tasks_select(tasks, ["10", "nope"])
