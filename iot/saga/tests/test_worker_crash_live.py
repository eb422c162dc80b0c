"""A real Celery worker (`scripts/platform.py worker`, beat included) SIGKILLed in the middle of a step.

The step has written its effect and blocks (inside its transaction) when the worker and its children are
killed. Postgres drops the transaction with the connection, and with it the effect and the run's lock;
the task is gone with the worker (acknowledged late, so it stays unacknowledged in the broker). A second
worker's sweeper finds the run once its lease has expired and runs the step again; the saga finishes
with every step's effect committed exactly once.

The test process queues nothing the worker would see (its Celery namespace is another), so the first step
is also started by the sweeper: the same path as a lost task.
"""

import time
import uuid

import psutil
import pytest
from django.db import connection

from iot.redis import get_redis
from iot.saga import saga_get, saga_start
from iot.saga.models import SagaRun
from iot.saga.tests.sagas import effects
from iot.testing.processes import ManagedProcess, Platform, database_url, platform_env, start_worker, wait_until
from iot.testing.redis import redis_namespace

pytestmark = [pytest.mark.live, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("effects_table")]

LEASE_SECONDS = 2.0
WORKER_ENV = {
    "SAGA_DEFINITION_MODULES": "iot.saga.tests.sagas",
    "SAGA_LEASE_SECONDS": str(LEASE_SECONDS),
    "SAGA_SWEEP_INTERVAL_SECONDS": "0.5",
    "SAGA_RETRY_BASE_SECONDS": "0.1",
    "SAGA_RETRY_MAX_SECONDS": "1",
    "WORKER_BEAT": "1",
    "WORKER_CONCURRENCY": "2",
    "EVENT_BUS_WORKER_COUNT": "0",
}


def kill_tree(worker: ManagedProcess) -> list[int]:
    """SIGKILL the worker runner and every process under it; returns their pids.

    `ManagedProcess.kill` kills the runner's process group only: its children (Celery and its pool) run in
    groups of their own and get SIGTERM from the runner's death, a warm shutdown that lets the step finish.
    """
    tree = psutil.Process(worker.process.pid).children(recursive=True)
    worker.kill()
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    return [process.pid for process in tree]


def test_a_worker_killed_mid_step_loses_nothing_and_repeats_nothing(settings, platform_logs):
    settings.SAGA_LEASE_SECONDS = LEASE_SECONDS
    prefix = f"iottest-saga-{uuid.uuid4().hex[:8]}"
    block_key = f"{prefix}:block"
    log_dir = platform_logs / "saga-crash"
    log_dir.mkdir(parents=True, exist_ok=True)
    with redis_namespace(prefix):
        env = platform_env(
            database=database_url(connection.settings_dict), extra={**WORKER_ENV, "REDIS_KEY_PREFIX": prefix}
        )
        running = Platform(env=env)
        try:
            run_id = saga_start(name="test.abc", key=uuid.uuid4().hex, context={"plan": {"b": {"block": block_key}}})
            first = start_worker(running, log_dir=log_dir, name="worker-1")
            wait_until(
                lambda: get_redis().exists(block_key), timeout=60, message=f"step b to block\n{first.log_tail()}"
            )
            # b has written its effect inside its open transaction; a's is committed.
            assert effects(run_id) == {("a", "forward"): 1}
            assert saga_get(run_id=run_id).current_step == "b"

            stepping_pid = int(get_redis().get(block_key))
            assert stepping_pid in kill_tree(first)  # the pool process inside the step, among others
            killed_at = time.monotonic()
            second = start_worker(running, log_dir=log_dir, name="worker-2")

            def ended():
                return SagaRun.objects.filter(pk=run_id).exclude(status="running").exists()

            wait_until(ended, timeout=90, interval=0.1, message=f"the saga to finish\n{second.log_tail()}")
            # b ran twice (the worker counts executions under its own key prefix), and committed once (below).
            assert get_redis().get(f"{prefix}:saga-test:executions:{run_id}:b:forward") == b"2"
            print(f"saga finished {time.monotonic() - killed_at:.1f} s after the kill (lease {LEASE_SECONDS} s)")
        finally:
            get_redis().rpush(f"{block_key}:release", 1)
            running.stop()

    run = saga_get(run_id=run_id)
    assert run.status == "succeeded", run
    assert [(step.name, step.status, step.attempts) for step in run.steps] == [
        ("a", "done", 1),
        ("b", "done", 1),  # the killed execution left no trace: its transaction never committed
        ("c", "done", 1),
    ]
    assert effects(run_id) == {
        ("a", "forward"): 1,
        ("b", "forward"): 1,
        ("c", "forward"): 1,
        ("on_finish", "succeeded"): 1,
    }
