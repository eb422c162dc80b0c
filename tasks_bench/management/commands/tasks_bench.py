"""`manage.py tasks_bench verify|export|list`: the seed's ten bug-fix tasks as a validated benchmark.

    python manage.py tasks_bench verify [--task ID ...] [--repeat N] [--json PATH] [--keep DIR]
    python manage.py tasks_bench export DIR [--task ID ...]
    python manage.py tasks_bench list

`verify` runs every task's graders on the clean code and with its bug.patch applied, in throw-away
copies of the repository (`tasks_bench.runner`), prints a table, writes the JSON report, and exits
with status 0 only if every task it verified is valid. `export` writes Terminal-Bench task
directories (`tasks_bench.export`). The runs need `DATABASE_URL` and `REDIS_URL` (each run derives
a database and a Redis prefix of its own from them); `make bench-tasks` provides both.
"""

import json
import os
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tasks_bench.catalog import TASKS_DIR, tasks_discover, tasks_select
from tasks_bench.export import bench_export
from tasks_bench.report import report_table
from tasks_bench.runner import BenchConfig, bench_verify

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_JSON = REPO_ROOT / "var" / "tasks_bench" / "verify.json"


class Command(BaseCommand):
    help = "Verify the bug-fix benchmark's tasks (clean and buggy runs of their graders), or export them."

    def add_arguments(self, parser):
        parser.add_argument("--repo", default=str(REPO_ROOT), help="The repository (default: this one).")
        parser.add_argument(
            "--tasks-dir", default=str(TASKS_DIR), help=f"The tasks, relative to the repository (default {TASKS_DIR})."
        )
        actions = parser.add_subparsers(dest="action", required=True)
        verify = actions.add_parser("verify", help="Prove each task valid: graders pass clean, fail with its bug.")
        verify.add_argument("--task", action="append", dest="tasks", metavar="ID", help="A task id or number.")
        verify.add_argument("--repeat", type=int, default=3, help="Runs per phase (default 3).")
        verify.add_argument("--json", dest="json_path", default=str(DEFAULT_JSON), help="Where to write the report.")
        verify.add_argument("--keep", metavar="DIR", help="Keep every copy and pytest log under DIR.")
        export = actions.add_parser("export", help="Write Terminal-Bench task directories.")
        export.add_argument("directory", metavar="DIR")
        export.add_argument("--task", action="append", dest="tasks", metavar="ID", help="A task id or number.")
        actions.add_parser("list", help="The tasks, and what is wrong with any that breaks the layout.")

    def handle(self, *args, action: str, **options):
        repo = Path(options["repo"]).resolve()
        tasks_dir = Path(options["tasks_dir"])
        tasks = tasks_discover(repo / tasks_dir)
        try:
            tasks = tasks_select(tasks, options.get("tasks"))
        except KeyError as exc:
            raise CommandError(exc.args[0]) from None
        if not tasks:
            raise CommandError(f"no task under {repo / tasks_dir}")
        if action == "list":
            for task in tasks:
                self.stdout.write(f"{task.id:40} {task.category:22} {task.problem or 'ok'}")
            return
        if action == "export":
            try:
                written = bench_export(
                    repo_root=repo, tasks=tasks, directory=Path(options["directory"]), tasks_dir=tasks_dir
                )
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            for path in written:
                self.stdout.write(f"wrote {path}")
            return
        if options["repeat"] < 1:
            raise CommandError("--repeat must be at least 1")
        keep = Path(options["keep"]).resolve() if options["keep"] else None
        # The runs inherit this process's environment: DATABASE_URL, REDIS_URL and REDIS_KEY_PREFIX are the
        # bases of their own names (a command reads its environment like the entry points do).
        config = BenchConfig.for_repo(repo, tasks_dir=tasks_dir, env=dict(os.environ), keep_dir=keep)
        report = bench_verify(
            tasks=tasks, config=config, repeat=options["repeat"], log=lambda line: self._progress(line)
        )
        json_path = Path(options["json_path"])
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        self.stdout.write("")
        self.stdout.write(report_table(report))
        self.stdout.write(f"JSON report: {json_path}")
        if not report["summary"]["all_valid"]:
            invalid = report["summary"]["total"] - report["summary"]["valid"]
            raise CommandError(f"{invalid} of {report['summary']['total']} task(s) not valid", returncode=1)

    def _progress(self, line: str) -> None:
        self.stdout.write(line)
        sys.stdout.flush()
