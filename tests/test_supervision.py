"""scripts/supervisor.py with trivial children: restart, backoff, crash-loop limit, stop, leftovers.

The supervisor runs in a thread of the test process (so the test can read its state) or, for
the signal tests, as a real runner process. No database is needed.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from iot.testing.processes import wait_until
from iot.testing.supervision import is_running

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("platform_supervisor", SCRIPTS / "supervisor.py")
supervisor = sys.modules["platform_supervisor"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(supervisor)
RestartPolicy, Supervisor = supervisor.RestartPolicy, supervisor.Supervisor

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
CRASH = [sys.executable, "-c", "import sys; sys.exit(3)"]
FAST = RestartPolicy(delay=0.05, max_delay=0.2, reset_after=60, limit=100, window=60, stop_timeout=5)


class Running:
    """A Supervisor run in a thread; its log lines are kept."""

    def __init__(self, commands, policy):
        self.lines: list[str] = []
        self.supervisor = Supervisor(commands, policy=policy, log=self.lines.append)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        children = self.supervisor.children.values()
        wait_until(lambda: all(child.starts for child in children), timeout=10, message="children started")

    def _run(self):
        self.exit_code = self.supervisor.run()

    def child(self, name):
        return self.supervisor.children[name]

    def stop(self, timeout=30):
        self.supervisor.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "supervisor did not stop"


@pytest.fixture
def supervise():
    started: list[Running] = []

    def start(commands, policy=FAST) -> Running:
        running = Running(commands, policy)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def test_delay_doubles_up_to_the_cap_and_starts_over_after_a_long_run():
    policy = RestartPolicy(delay=0.5, max_delay=15, reset_after=30)
    delays, previous = [], None
    for _ in range(7):
        previous = policy.next_delay(previous, uptime=1.0)
        delays.append(previous)
    assert delays == [0.5, 1, 2, 4, 8, 15, 15]
    assert policy.next_delay(15, uptime=30.0) == 0.5


def test_policy_from_the_environment():
    policy = RestartPolicy.from_env(
        {"PLATFORM_RESTART_DELAY_SECONDS": "0.25", "PLATFORM_RESTART_LIMIT": "9", "PLATFORM_RESTART_WINDOW_SECONDS": ""}
    )
    assert (policy.delay, policy.limit, policy.window, policy.max_delay) == (0.25, 9, 60, 15)
    with pytest.raises(ValueError, match="PLATFORM_RESTART_LIMIT='many'"):
        RestartPolicy.from_env({"PLATFORM_RESTART_LIMIT": "many"})


def test_a_killed_child_is_restarted_and_the_others_are_untouched(supervise):
    running = supervise({"a": SLEEP, "b": SLEEP, "c": SLEEP})
    before = running.supervisor.pids()
    os.kill(before["b"], signal.SIGKILL)
    wait_until(lambda: running.supervisor.pids()["b"] not in (None, before["b"]), timeout=10, message="b restarted")
    after = running.supervisor.pids()
    assert (after["a"], after["c"]) == (before["a"], before["c"])
    assert is_running(after["a"]) and is_running(after["b"]) and is_running(after["c"])
    assert len(running.child("a").starts) == len(running.child("c").starts) == 1
    assert any(line.startswith(f"b (pid {before['b']}) exited with signal SIGKILL") for line in running.lines)


def test_restarts_back_off_exponentially_up_to_the_cap(supervise):
    running = supervise({"steady": SLEEP, "crashing": CRASH})
    steady = running.supervisor.pids()["steady"]
    crashing = running.child("crashing")
    wait_until(lambda: len(crashing.starts) >= 6, timeout=20, message="five restarts")
    assert crashing.delays[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]
    gaps = [later - earlier for earlier, later in zip(crashing.starts, crashing.starts[1:], strict=False)]
    # Each restart waited at least its delay after the start before it (the exit came later still).
    assert all(gap >= delay for gap, delay in zip(gaps, crashing.delays, strict=False))
    assert running.supervisor.pids()["steady"] == steady


def test_the_delay_starts_over_when_the_child_had_stayed_up(supervise):
    lives_a_while = [sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(1)"]
    policy = RestartPolicy(delay=0.05, max_delay=1, reset_after=0.2, limit=100, window=60, stop_timeout=5)
    running = supervise({"child": lives_a_while}, policy)
    wait_until(lambda: len(running.child("child").delays) >= 3, timeout=20, message="three restarts")
    assert running.child("child").delays[:3] == [0.05, 0.05, 0.05]


def test_a_crash_loop_is_given_up_and_stops_everything(supervise):
    policy = RestartPolicy(delay=0.01, max_delay=0.02, reset_after=60, limit=3, window=60, stop_timeout=5)
    running = supervise({"steady": SLEEP, "broken": CRASH}, policy)
    steady = running.child("steady").process
    running.thread.join(20)
    assert not running.thread.is_alive()
    assert running.exit_code == 1
    assert len(running.child("broken").starts) == 4  # the first start and 3 restarts
    assert any(line.startswith("giving up on broken: it exited with status 3") for line in running.lines)
    assert steady.returncode == -signal.SIGTERM  # stopped the graceful way


def test_restarts_further_apart_than_the_window_are_not_a_crash_loop(supervise):
    lives_a_while = [sys.executable, "-c", "import time, sys; time.sleep(0.2); sys.exit(1)"]
    # At most one exit fits in 0.15 s, so a limit of 1 restart per 0.15 s is never reached.
    policy = RestartPolicy(delay=0.01, max_delay=0.01, reset_after=60, limit=1, window=0.15, stop_timeout=5)
    running = supervise({"child": lives_a_while}, policy)
    wait_until(lambda: len(running.child("child").starts) >= 5, timeout=20, message="four restarts")
    assert running.thread.is_alive()
    assert not any("giving up" in line for line in running.lines)


def _ignoring_sigterm(ready: Path) -> list[str]:
    """A child that ignores SIGTERM, and creates `ready` once it does."""
    code = f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open({str(ready)!r}, 'w')"
    code += "; time.sleep(600)"
    return [sys.executable, "-c", code]


def test_stop_terminates_children_and_kills_the_ones_that_ignore_it(supervise, tmp_path):
    ready = tmp_path / "ignoring"
    stubborn = _ignoring_sigterm(ready)
    running = supervise({"graceful": SLEEP, "stubborn": stubborn}, RestartPolicy(stop_timeout=0.5))
    graceful, ignoring = running.child("graceful").process, running.child("stubborn").process
    wait_until(ready.exists, timeout=10, message="SIGTERM ignored")
    started = time.monotonic()
    running.stop()
    assert time.monotonic() - started < 5
    assert running.exit_code == 0
    assert graceful.returncode == -signal.SIGTERM
    assert ignoring.returncode == -signal.SIGKILL
    assert any(line.startswith("stubborn (pid") and "killing it" in line for line in running.lines)


def test_a_second_stop_request_kills_at_once(supervise, tmp_path):
    ready = tmp_path / "ignoring"
    stubborn = _ignoring_sigterm(ready)
    running = supervise({"stubborn": stubborn}, RestartPolicy(stop_timeout=600))
    wait_until(ready.exists, timeout=10, message="SIGTERM ignored")
    running.supervisor.request_stop()
    running.supervisor.request_stop()  # Ctrl-C twice
    running.thread.join(10)
    assert not running.thread.is_alive()
    assert running.child("stubborn").process.returncode == -signal.SIGKILL


def test_what_a_dead_child_left_behind_is_killed_before_the_restart(supervise, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    parent = [
        sys.executable,
        "-c",
        textwrap.dedent(
            f"""
            import subprocess, sys, time
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open({str(pid_file)!r}, "w").write(str(grandchild.pid))
            time.sleep(600)
            """
        ),
    ]
    running = supervise({"parent": parent})
    grandchild = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=10, message="grandchild"))
    first = running.supervisor.pids()["parent"]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: running.supervisor.pids()["parent"] not in (None, first), timeout=10, message="restart")
    wait_until(lambda: not is_running(grandchild), timeout=10, message="the orphan killed")


RUNNER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {scripts!r})
    from supervisor import RestartPolicy, Supervisor
    supervisor = Supervisor({{"a": {sleep!r}, "b": {sleep!r}}}, policy=RestartPolicy(stop_timeout=5))
    supervisor.install_signal_handlers()
    sys.exit(supervisor.run())
    """
)


def _runner() -> tuple[subprocess.Popen, list[psutil.Process]]:
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER.format(scripts=str(SCRIPTS), sleep=SLEEP)], start_new_session=True
    )
    children = wait_until(
        lambda: len(psutil.Process(runner.pid).children()) == 2 and psutil.Process(runner.pid).children(),
        timeout=10,
        message="the runner's children",
    )
    return runner, children


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_runner_stops_every_child(signum):
    runner, children = _runner()
    try:
        runner.send_signal(signum)
        assert runner.wait(timeout=30) == 0
        assert [child.pid for child in children if is_running(child.pid)] == []
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_children_stop_when_the_runner_is_killed():
    runner, children = _runner()
    runner.kill()
    runner.wait()
    wait_until(lambda: not any(is_running(child.pid) for child in children), timeout=10, message="children gone")
