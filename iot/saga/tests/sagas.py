"""Sagas used only by the saga tests: imported by the tests, and by a worker started with
`SAGA_DEFINITION_MODULES=iot.saga.tests.sagas` (as `iot.tests.event_handlers` is loaded by consumers).

`test.abc` has three steps, `a`, `b`, `c`, each with a compensation. What a step does is set per run in
the context's `plan` (`{"b": {"transient": 2}}`), so each test picks its own behaviour:

* `transient: n`: the first n executions raise RuntimeError (after writing their effect, which must roll back);
* `fail: reason`: raise StepFailed (after writing the effect);
* `wait_for: flag key`: StepWait until that Redis key exists or `wait_seconds` (default 60) have passed;
* `block: key`: the first execution (the one that SETs `key`) blocks until `<key>:release` is pushed (or 60 s),
  after writing its effect: a worker to kill mid-step;
* `return: value`: return this instead of a dict (a wrong result);
* `compensate_transient: n`: the compensation fails its first n executions (StepFailed, then RuntimeError).

Each completed execution counts one effect in the table `saga_test_effect` (run, step, phase) inside the
step's transaction; `on_finish` counts ("on_finish", <final status>). Exactly once = every count is 1.
A function in `HOOKS[run id]` is called as `hook(step name)` at the start of every execution (in-process tests).
"""

import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from django.db import connection
from django.utils import timezone

from iot.redis import get_redis, redis_key
from iot.saga import SagaDefinition, SagaRunView, SagaStep, StepFailed, StepWait, saga_register

EFFECTS_TABLE = "saga_test_effect"
HOOKS: dict[str, Callable[[str], None]] = {}


def effects_table_create() -> None:
    """The effects table (not a model: only these tests use it; it survives the transactional tests' flush)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {EFFECTS_TABLE} (run_id uuid NOT NULL, step text NOT NULL, "
            "phase text NOT NULL, count integer NOT NULL, PRIMARY KEY (run_id, step, phase))"
        )


def effect_record(run_id: uuid.UUID, step: str, phase: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {EFFECTS_TABLE} AS e VALUES (%s, %s, %s, 1) "
            "ON CONFLICT (run_id, step, phase) DO UPDATE SET count = e.count + 1",
            [run_id, step, phase],
        )


def effects(run_id: uuid.UUID) -> dict[tuple[str, str], int]:
    """{(step, phase): how many times its effect committed}."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT step, phase, count FROM {EFFECTS_TABLE} WHERE run_id = %s", [run_id])
        return {(step, phase): count for step, phase, count in cursor.fetchall()}


def executions(run_id: uuid.UUID, step: str, phase: str = "forward") -> int:
    """How many times the step's function was entered (committed or not)."""
    return int(get_redis().get(redis_key("saga-test", "executions", run_id, step, phase)) or 0)


def _executions(run_id: uuid.UUID, step: str, phase: str) -> int:
    """Executions so far, this one included; kept in Redis, so a rolled-back (or killed) one still counts."""
    return get_redis().incr(redis_key("saga-test", "executions", run_id, step, phase))


def _block_once(key: str) -> None:
    client = get_redis()
    if client.set(key, os.getpid(), nx=True):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not client.blpop([f"{key}:release"], timeout=1):
            pass


def _action(name: str):
    def action(run: SagaRunView):
        plan = run.context.get("plan", {}).get(name, {})
        hook = HOOKS.get(str(run.id))
        if hook is not None:
            hook(name)
        execution = _executions(run.id, name, "forward")
        update = {f"{name}_done": True}
        if "wait_for" in plan and not get_redis().exists(plan["wait_for"]):
            deadline_field = f"{name}_deadline"
            deadline = run.context.get(deadline_field)
            if deadline is None:
                deadline = (timezone.now() + timedelta(seconds=plan.get("wait_seconds", 60))).isoformat()
            if timezone.now() < datetime.fromisoformat(deadline):
                return StepWait(until=datetime.fromisoformat(deadline), context={deadline_field: deadline})
            update[f"{name}_timed_out"] = True
        effect_record(run.id, name, "forward")
        if "block" in plan:
            _block_once(plan["block"])
        if execution <= plan.get("transient", 0):
            raise RuntimeError(f"{name} flaked")
        if "fail" in plan:
            raise StepFailed(plan["fail"])
        if "return" in plan:
            return plan["return"]
        return update

    return action


def _compensation(name: str):
    def compensate(run: SagaRunView) -> None:
        plan = run.context.get("plan", {}).get(name, {})
        effect_record(run.id, name, "compensate")
        execution = _executions(run.id, name, "compensate")
        if execution <= plan.get("compensate_transient", 0):
            if execution % 2:
                raise StepFailed(f"undoing {name} failed")
            raise RuntimeError(f"undoing {name} flaked")

    return compensate


def _on_finish(run: SagaRunView) -> None:
    effect_record(run.id, "on_finish", run.status)


ABC = SagaDefinition(
    name="test.abc",
    steps=[SagaStep(name=n, action=_action(n), compensate=_compensation(n), max_attempts=3) for n in "abc"],
    on_finish=_on_finish,
)
# `b` has nothing to undo: compensation goes from c straight to a.
NO_UNDO_B = SagaDefinition(
    name="test.no_undo_b",
    steps=[
        SagaStep(name="a", action=_action("a"), compensate=_compensation("a")),
        SagaStep(name="b", action=_action("b")),
        SagaStep(name="c", action=_action("c"), compensate=_compensation("c")),
    ],
)
saga_register(definition=ABC)
saga_register(definition=NO_UNDO_B)
