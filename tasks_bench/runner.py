"""`tasks_bench verify`: proves each task is a valid bug-fix task, the way SWE-bench validates its instances.

For every task, in throw-away copies of the repository (never the working tree):

1. **clean**: the grader tests run against the code as it is; every one must pass (a skip is not a
   pass);
2. **buggy**: the task's `bug.patch` is applied (its SHA-256 recorded) and the graders run again; at
   least one must fail by an assertion or a timeout (FAIL_TO_PASS >= 1). A grader that passes on
   clean code and errors out here (a fixture or import error, an unexpected exception), or a bug
   that breaks collection, makes the task invalid: it would grade the crash, not the behaviour;
3. both runs are repeated `repeat` times; a test whose outcome differs between repeats is flaky and
   the task is not valid;
4. each run (one pytest process) is bounded by the task's `max_test_timeout_sec`: past it the whole
   process tree (the live platform the graders started included) is killed and the run reported as
   `timeout`.

Every run starts from a fresh copy of the working tree (`.venv`, `var/`, `.git`, `__pycache__` and
the other ignored files left out; `.venv` symlinked back), with `PYTHONDONTWRITEBYTECODE=1`, so no
run sees bytecode or files another left. Each run gets a database name and a Redis key prefix of
its own (derived from `DATABASE_URL` / `REDIS_KEY_PREFIX`), dropped and emptied afterwards, so runs
never share state.

Outcomes come from pytest's JUnit XML: per test `passed`, `failed` (an assertion, `pytest.fail`),
`timeout` (a `*Timeout*` exception), `error` (setup/teardown errors and any other exception) or
`skipped`.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil

from tasks_bench.catalog import Task

# Left out of every copy: the environment, runtime data, VCS, bytecode and caches (what .gitignore lists).
COPY_IGNORED = (".venv", "var", ".git", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "staticfiles", ".env")
OUTCOMES = ("passed", "failed", "timeout", "error", "skipped")
VERDICTS = ("valid", "invalid", "flaky", "timeout")
# Kept in the report when a run went wrong, so the reason can be read without the logs.
OUTPUT_TAIL_CHARS = 3000
# Postgres identifiers are at most 63 bytes, and pytest-django adds "test_".
_DB_NAME_MAX = 63 - len("test_")

Log = Callable[[str], None]


@dataclass
class RunResult:
    """One pytest run of a task's graders: `status` ok (pytest finished), timeout, collection_error,
    no_tests, pytest_error (internal or usage error) or patch_failed."""

    phase: str
    index: int
    status: str
    duration_s: float
    exit_code: int | None = None
    tests: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    output_tail: str = ""
    log_path: str | None = None

    def counts(self) -> dict[str, int]:
        return {outcome: sum(1 for value in self.tests.values() if value == outcome) for outcome in OUTCOMES}


@dataclass
class TaskReport:
    id: str
    category: str
    verdict: str
    reason: str
    patch_sha256: str | None = None
    fail_to_pass: list[str] = field(default_factory=list)
    pass_to_pass: list[str] = field(default_factory=list)
    fail_to_fail: list[str] = field(default_factory=list)
    pass_to_fail: list[str] = field(default_factory=list)
    flaky: list[str] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict:
        data = asdict(self)
        runs = data.pop("runs")
        data["phases"] = {}
        for phase in ("clean", "buggy"):
            phase_runs = [run for run in runs if run["phase"] == phase]
            data["phases"][phase] = [
                {
                    "run": run["index"],
                    "status": run["status"],
                    "exit_code": run["exit_code"],
                    "duration_s": run["duration_s"],
                    "counts": {o: sum(1 for v in run["tests"].values() if v == o) for o in OUTCOMES},
                    "tests": run["tests"],
                    **({"messages": run["messages"]} if run["messages"] else {}),
                    **({"output_tail": run["output_tail"]} if run["output_tail"] else {}),
                    **({"log": run["log_path"]} if run["log_path"] else {}),
                }
                for run in phase_runs
            ]
        return data


@dataclass(frozen=True)
class BenchConfig:
    """Where the code and the tasks are, and what every run inherits.

    `env` is the environment the runs start from (the caller's); `DATABASE_URL` and
    `REDIS_KEY_PREFIX` in it are the bases of each run's own names. `keep_dir`: keep every copy
    and log there instead of deleting them.
    """

    repo_root: Path
    tasks_dir: Path
    env: dict[str, str]
    python: str
    keep_dir: Path | None = None

    @classmethod
    def for_repo(cls, repo_root: Path, *, tasks_dir: Path, env: dict[str, str], keep_dir: Path | None = None):
        """The venv's interpreter seen through the copy's `.venv` symlink if the repository has one, else ours."""
        venv_python = repo_root / ".venv" / "bin" / "python"
        python = ".venv/bin/python" if venv_python.exists() else sys.executable
        return cls(repo_root=repo_root, tasks_dir=tasks_dir, env=dict(env), python=python, keep_dir=keep_dir)


# --- the copy ---------------------------------------------------------------------------------------


def repo_copy(*, source: Path, dest: Path) -> Path:
    """The working tree of `source` copied to `dest` (which must not exist), `.venv` symlinked back."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*COPY_IGNORED), symlinks=True)
    venv = source / ".venv"
    if venv.exists():
        (dest / ".venv").symlink_to(venv.resolve(), target_is_directory=True)
    return dest


def _git_env(copy: Path) -> dict[str, str]:
    # Git must treat the copy as a plain directory even when it sits inside a repository (a --keep
    # directory under the working tree): no discovery above it, so `git apply` patches the copy only.
    return {**os.environ, "GIT_CEILING_DIRECTORIES": str(copy.parent.resolve())}


def patch_apply(*, copy: Path, patch: Path) -> tuple[bool, str]:
    """Apply `patch` to `copy` (`git apply`, or `patch -p1` without git); (applied, what the tool said).

    Checked first, so a patch that does not apply leaves the copy untouched.
    """
    patch = patch.resolve()
    if shutil.which("git"):
        commands = [
            ["git", "apply", "--check", "--whitespace=nowarn", str(patch)],
            ["git", "apply", "--whitespace=nowarn", str(patch)],
        ]
    else:
        commands = [
            ["patch", "-p1", "--dry-run", "--batch", "--forward", "-i", str(patch)],
            ["patch", "-p1", "--batch", "--forward", "-i", str(patch)],
        ]
    for command in commands:
        result = subprocess.run(command, cwd=copy, env=_git_env(copy), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip()
            return False, f"{' '.join(command[:2])}: {said[-1500:]}"
    return True, ""


# --- a run's own database and Redis namespace --------------------------------------------------------


def run_database_url(base_url: str, suffix: str) -> tuple[str, str]:
    """`base_url` with its database name replaced by `<name>_<suffix>` (at most 58 characters, so that
    pytest-django's `test_` prefix fits); returns (url, the name). Handles the socket form
    `postgres://user@:5432//socket/dir/name` as well."""
    parts = urlsplit(base_url)
    head, _, base_name = parts.path.rpartition("/")
    name = f"{base_name or 'iot'}_{suffix}"
    if len(name) > _DB_NAME_MAX:
        name = f"{base_name[: _DB_NAME_MAX - len(suffix) - 1]}_{suffix}"
    return urlunsplit(parts._replace(path=f"{head}/{name}")), name


def _databases_drop(url: str, names: list[str]) -> None:
    """Drop the run's databases (pytest-django's `test_<name>` normally goes by itself; not after a kill)."""
    try:
        import environ
        import psycopg
        from psycopg import sql
    except ImportError:
        return
    config = environ.Env.db_url_config(url)
    params = {
        key: value
        for key, value in {
            "host": config.get("HOST"),
            "port": config.get("PORT"),
            "user": config.get("USER"),
            "password": config.get("PASSWORD"),
        }.items()
        if value
    }
    try:
        with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=10, **params) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error:
        pass  # best effort: a leftover database is named after the run, never reused


def _redis_prefix_flush(url: str, prefix: str) -> None:
    """Delete the run's keys (`<prefix>:*`; the graders' platforms use prefixes inside it)."""
    try:
        import redis
    except ImportError:
        return
    try:
        client = redis.Redis.from_url(url)
        page = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            page.append(key)
            if len(page) == 1000:
                client.unlink(*page)
                page = []
        if page:
            client.unlink(*page)
    except (redis.RedisError, OSError, ValueError):
        pass


# --- one pytest run -----------------------------------------------------------------------------------


def process_tree_kill(pid: int) -> None:
    """SIGKILL a process and every descendant.

    The graders' live platforms run in sessions of their own (`start_new_session`), so killing the
    pytest process group alone would leave their servers running; the tree is walked instead, twice
    (a supervisor may have started a child in between).
    """
    for _ in range(2):
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)


def _failure_outcome(message: str) -> str:
    """`failed` for an assertion, `timeout` for a timeout, `error` for any other exception."""
    head = message.strip().split("\n", 1)[0]
    kind = head.split(":", 1)[0].strip()
    if kind.startswith("assert ") or kind == "assert" or kind.rsplit(".", 1)[-1] in ("AssertionError", "Failed"):
        return "failed"
    if "Timeout" in kind.rsplit(".", 1)[-1]:
        return "timeout"
    return "error"


def junit_outcomes(path: Path) -> tuple[dict[str, str], dict[str, str], bool]:
    """Per test (its name, `Class::name` inside a class) its outcome and, when not passed, the message;
    and whether pytest reported a collection error."""
    tests: dict[str, str] = {}
    messages: dict[str, str] = {}
    collection_error = False
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return tests, messages, collection_error
    for case in root.iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if error is not None and (error.get("message") or "") == "collection failure":
            collection_error = True
            tests[f"<collection> {name or classname}"] = "error"
            messages[f"<collection> {name or classname}"] = (error.text or "")[-OUTPUT_TAIL_CHARS:]
            continue
        last = classname.rsplit(".", 1)[-1] if classname else ""
        test_id = f"{last}::{name}" if last and not last.startswith("test_") else name
        if failure is not None:
            message = failure.get("message") or ""
            tests[test_id] = _failure_outcome(message)
            messages[test_id] = message[:500]
        elif error is not None:
            tests[test_id] = "error"
            messages[test_id] = (error.get("message") or "")[:500]
        elif skipped is not None:
            tests[test_id] = "skipped"
            messages[test_id] = (skipped.get("message") or "")[:500]
        else:
            tests[test_id] = "passed"
    return tests, messages, collection_error


def pytest_run(
    *, copy: Path, task: Task, config: BenchConfig, phase: str, index: int, run_dir: Path, suffix: str
) -> RunResult:
    """Run the task's graders once in `copy`; bounded by the task's `max_test_timeout_sec`."""
    junit = run_dir / f"{phase}-{index}.xml"
    log_path = run_dir / f"{phase}-{index}.log"
    env = dict(config.env)
    # pytest reads the settings module from pyproject.toml; one inherited from `manage.py` would win.
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    databases: list[str] = []
    if env.get("DATABASE_URL"):
        env["DATABASE_URL"], name = run_database_url(env["DATABASE_URL"], suffix)
        databases = [f"test_{name}", name]
    prefix = f"{env.get('REDIS_KEY_PREFIX') or 'iottest'}-{suffix}"
    env["REDIS_KEY_PREFIX"] = prefix
    tests = task.tests_dir.relative_to(config.repo_root).as_posix()
    command = [
        config.python,
        "-m",
        "pytest",
        tests,
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        f"--junitxml={junit}",
        "-o",
        "junit_logging=no",
    ]
    started = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=task.max_test_timeout_sec)
        except subprocess.TimeoutExpired:
            timed_out = True
            process_tree_kill(process.pid)
            process.wait()
    duration = round(time.monotonic() - started, 2)
    if databases:
        _databases_drop(env["DATABASE_URL"], databases)
    if env.get("REDIS_URL"):
        _redis_prefix_flush(env["REDIS_URL"], prefix)
    outcomes, messages, collection_error = junit_outcomes(junit)
    output = log_path.read_text(errors="replace")
    code = None if timed_out else process.returncode
    if timed_out:
        status = "timeout"
    elif collection_error or code == 2:
        status = "collection_error"
    elif code == 5:
        status = "no_tests"
    elif code not in (0, 1):
        status = "pytest_error"
    else:
        status = "ok"
    return RunResult(
        phase=phase,
        index=index,
        status=status,
        duration_s=duration,
        exit_code=code,
        tests=outcomes,
        messages=messages,
        output_tail=output[-OUTPUT_TAIL_CHARS:] if status != "ok" else "",
        log_path=str(log_path) if config.keep_dir else None,
    )


# --- the verdict ----------------------------------------------------------------------------------------


def _normal(outcome: str | None) -> str:
    """What repeats are compared on: a failed assertion and a timeout both mean "fails"."""
    if outcome is None:
        return "missing"
    return "fail" if outcome in ("failed", "timeout") else {"passed": "pass"}.get(outcome, outcome)


def task_verdict(report: TaskReport, clean: list[RunResult], buggy: list[RunResult], repeat: int) -> None:
    """Fill in the verdict, its reason and the test lists from the runs (see the module docstring)."""
    runs = [*clean, *buggy]
    late = [run for run in runs if run.status == "timeout"]
    if late:
        run = late[0]
        report.verdict, report.reason = "timeout", f"{run.phase} run {run.index} exceeded max_test_timeout_sec"
        return
    for run in runs:
        if run.status != "ok":
            what = {
                "collection_error": "the graders do not collect (an import or syntax error)",
                "no_tests": "no grader test was collected",
                "pytest_error": f"pytest stopped with exit status {run.exit_code}",
            }.get(run.status, run.status)
            if run.phase == "buggy" and run.status == "collection_error":
                what = "the bug breaks the graders' collection (an import error), not a test's assertion"
            report.verdict, report.reason = "invalid", f"{run.phase} run {run.index}: {what}"
            return
    names = sorted({name for run in runs for name in run.tests})
    outcomes = {
        name: {
            phase: [_normal(run.tests.get(name)) for run in phase_runs]
            for phase, phase_runs in (("clean", clean), ("buggy", buggy))
        }
        for name in names
    }
    report.flaky = [name for name in names if any(len(set(seen)) > 1 for seen in outcomes[name].values())]
    stable = {name: seen for name, seen in outcomes.items() if name not in report.flaky}
    # SWE-bench's names: <outcome on the buggy code>_TO_<outcome on the clean code>.
    report.fail_to_pass = [n for n, s in stable.items() if s["buggy"][0] == "fail" and s["clean"][0] == "pass"]
    report.pass_to_pass = [n for n, s in stable.items() if s["buggy"][0] == "pass" and s["clean"][0] == "pass"]
    report.fail_to_fail = [n for n, s in stable.items() if s["buggy"][0] != "pass" and s["clean"][0] != "pass"]
    report.pass_to_fail = [n for n, s in stable.items() if s["buggy"][0] == "pass" and s["clean"][0] != "pass"]
    if report.flaky:
        report.verdict = "flaky"
        report.reason = f"outcome differs between the {repeat} repeats: {', '.join(report.flaky)}"
        return
    not_passing = {n: s["clean"][0] for n, s in stable.items() if s["clean"][0] != "pass"}
    if not_passing:
        described = ", ".join(f"{n} ({outcome})" for n, outcome in not_passing.items())
        report.verdict, report.reason = "invalid", f"not every grader passes on the clean code: {described}"
        return
    broken = {n: s["buggy"][0] for n, s in stable.items() if s["buggy"][0] not in ("pass", "fail")}
    if broken:
        described = ", ".join(f"{n} ({outcome})" for n, outcome in broken.items())
        report.verdict = "invalid"
        report.reason = f"on the buggy code these error out instead of failing an assertion: {described}"
        return
    if not report.fail_to_pass:
        report.verdict, report.reason = "invalid", "no grader fails on the buggy code: the bug is not detected"
        return
    report.verdict, report.reason = "valid", ""


# --- a task, and the whole bench ------------------------------------------------------------------------


def task_verify(*, task: Task, config: BenchConfig, repeat: int, log: Log = print) -> TaskReport:
    """Verify one task: clean runs, then buggy runs, each in a fresh copy (see the module docstring)."""
    started = time.monotonic()
    report = TaskReport(
        id=task.id, category=task.category, verdict="invalid", reason="", patch_sha256=task.patch_sha256()
    )
    if task.problem:
        report.reason = task.problem
        report.durations = {"total_s": 0.0}
        return report
    base = (
        config.keep_dir / task.id if config.keep_dir else Path(tempfile.mkdtemp(prefix=f"tasks-bench-{task.id[:2]}-"))
    )
    base.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:6]
    try:
        # A patch that no longer applies is the rot this check exists for: say so before running anything.
        probe = repo_copy(source=config.repo_root, dest=base / "patch-check")
        applied, said = patch_apply(copy=probe, patch=task.patch_path)
        shutil.rmtree(probe, ignore_errors=True)
        if not applied:
            report.reason = f"bug.patch does not apply: {said}"
            report.durations = {"total_s": round(time.monotonic() - started, 2)}
            return report
        clean: list[RunResult] = []
        buggy: list[RunResult] = []
        for phase, results in (("clean", clean), ("buggy", buggy)):
            for index in range(1, repeat + 1):
                copy = repo_copy(source=config.repo_root, dest=base / f"{phase}-{index}")
                if phase == "buggy":
                    applied, said = patch_apply(copy=copy, patch=task.patch_path)
                    if not applied:  # it applied a moment ago: only a changing working tree gets here
                        results.append(RunResult(phase=phase, index=index, status="patch_failed", duration_s=0.0))
                        report.reason = f"bug.patch does not apply: {said}"
                        break
                suffix = f"tb{task.id[:2]}{phase[0]}{index}{token}"
                result = pytest_run(
                    copy=copy, task=task, config=config, phase=phase, index=index, run_dir=base, suffix=suffix
                )
                results.append(result)
                counts = ", ".join(f"{n} {o}" for o, n in result.counts().items() if n)
                log(
                    f"  {task.id} {phase} {index}/{repeat}: {result.status} "
                    f"({counts or 'no tests'}) {result.duration_s:.0f} s"
                )
                if not config.keep_dir:
                    shutil.rmtree(copy, ignore_errors=True)
                if result.status in ("timeout", "collection_error", "no_tests", "pytest_error"):
                    break  # the verdict is decided; the repeats would only take time
            if results and results[-1].status != "ok":
                break
        report.runs = [*clean, *buggy]
        if any(run.status == "patch_failed" for run in buggy):
            report.verdict = "invalid"
        else:
            task_verdict(report, clean, buggy, repeat)
        report.durations = {
            "clean_s": round(sum(run.duration_s for run in clean), 2),
            "buggy_s": round(sum(run.duration_s for run in buggy), 2),
            "total_s": round(time.monotonic() - started, 2),
        }
        return report
    finally:
        if not config.keep_dir:
            shutil.rmtree(base, ignore_errors=True)


def _file_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def environment_describe(config: BenchConfig) -> dict:
    """Python, Django and pytest versions (of the interpreter the runs use), the requirements' hash, the commit."""
    probe = (
        "import json, platform, django, pytest; print(json.dumps({'python': platform.python_version(), "
        "'django': django.get_version(), 'pytest': pytest.__version__}))"
    )
    python = config.python if Path(config.python).is_absolute() else str(config.repo_root / config.python)
    try:
        versions = json.loads(
            subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
        )
    except (subprocess.SubprocessError, ValueError, OSError):
        versions = {"python": sys.version.split()[0], "django": None, "pytest": None}
    commit = (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=config.repo_root, capture_output=True, text=True
        ).stdout.strip()
        if shutil.which("git")
        else ""
    )
    dirty = bool(
        commit
        and subprocess.run(
            ["git", "status", "--porcelain"], cwd=config.repo_root, capture_output=True, text=True
        ).stdout.strip()
    )
    requirements = sorted(config.repo_root.glob("requirements*.txt"))
    return {
        **versions,
        "requirements_sha256": _file_sha256(requirements) if requirements else None,
        "requirements_files": [path.name for path in requirements],
        "commit": commit or None,
        "working_tree_dirty": dirty,
        "cpus": os.cpu_count(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def bench_verify(*, tasks: list[Task], config: BenchConfig, repeat: int, log: Log = print) -> dict:
    """Verify `tasks` one after the other; the report (JSON-ready): tasks, environment, summary."""
    started = time.monotonic()
    environment = environment_describe(config)
    reports = []
    for task in tasks:
        log(f"{task.id}: verifying ({repeat} clean + {repeat} buggy runs)")
        report = task_verify(task=task, config=config, repeat=repeat, log=log)
        log(f"{task.id}: {report.verdict}{': ' + report.reason if report.reason else ''}")
        reports.append(report)
    summary = {verdict: sum(1 for report in reports if report.verdict == verdict) for verdict in VERDICTS}
    summary.update(total=len(reports), repeat=repeat, duration_s=round(time.monotonic() - started, 2))
    summary["all_valid"] = bool(reports) and summary["valid"] == len(reports)
    return {"tasks": [report.as_json() for report in reports], "environment": environment, "summary": summary}
