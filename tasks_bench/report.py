"""The verify report as a table for the terminal (the JSON is `runner.bench_verify`'s dict as is)."""

SHORT = {"passed": "p", "failed": "f", "timeout": "t", "error": "e", "skipped": "s"}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _phase_cell(runs: list[dict]) -> str:
    """The runs of one phase: `9p x3` when every repeat gave the same counts, else each run's, `5p4f/9p`."""
    if not runs:
        return "-"
    cells = []
    for run in runs:
        if run["status"] != "ok":
            cells.append(run["status"])
            continue
        counts = "".join(f"{n}{SHORT[outcome]}" for outcome, n in run["counts"].items() if n)
        cells.append(counts or "0")
    if len(set(cells)) == 1:
        return f"{cells[0]} x{len(cells)}"
    return "/".join(cells)


def report_table(report: dict) -> str:
    """One line per task (verdict, FAIL_TO_PASS and PASS_TO_PASS counts, each phase's outcomes, time,
    reason), then the summary and the environment."""
    header = ("task", "category", "verdict", "F2P", "P2P", "clean", "buggy", "time", "reason")
    rows = [
        (
            task["id"],
            task["category"] or "-",
            task["verdict"],
            str(len(task["fail_to_pass"])),
            str(len(task["pass_to_pass"])),
            _phase_cell(task["phases"]["clean"]) if "phases" in task else "-",
            _phase_cell(task["phases"]["buggy"]) if "phases" in task else "-",
            _duration(task["durations"].get("total_s", 0.0)),
            task["reason"],
        )
        for task in report["tasks"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1][:300]]).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths) + "  ------")
    summary = report["summary"]
    env = report["environment"]
    lines.append("")
    lines.append(
        f"{summary['valid']}/{summary['total']} valid ({summary['invalid']} invalid, {summary['flaky']} flaky, "
        f"{summary['timeout']} timeout), {summary['repeat']} repeat(s) per phase, {_duration(summary['duration_s'])}"
    )
    lines.append(
        f"Python {env.get('python')}, Django {env.get('django')}, pytest {env.get('pytest')}, "
        f"requirements {str(env.get('requirements_sha256'))[:12]}, commit {str(env.get('commit'))[:10]}"
        f"{' (dirty)' if env.get('working_tree_dirty') else ''}, load {env.get('load_average')}"
    )
    lines.append(
        "p passed, f failed (assertion), t timed out, e error, s skipped; F2P fails on the bug and passes "
        "on the clean code, P2P passes on both"
    )
    return "\n".join(lines)
