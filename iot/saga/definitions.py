"""What a saga is made of (definitions, step outcomes, read views) and the registry of definitions.

Nothing here touches the database, so `iot.saga` can export it before Django's apps are loaded.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from iot.errors import ServiceError


class StepFailed(Exception):
    """Raised by a step: a permanent failure. The saga is not retried; it compensates its completed steps."""


@dataclass(frozen=True)
class StepWait:
    """Returned by a step: not done yet. The step runs again when `saga_signal()` is called for the run or once
    `until` (an aware datetime) has passed, whichever comes first; `context` is merged into the run's context.

    The step computes its deadline once and keeps it in the context (e.g. on its first run): a step that answers
    `now + 10 min` on every run would push its deadline out each time it is woken.
    """

    until: datetime
    context: dict[str, Any] | None = None

    def __post_init__(self):
        if self.until.tzinfo is None:
            raise ValueError("StepWait.until must be an aware datetime")


@dataclass(frozen=True)
class StepLogView:
    """One row of a run's step log: one step (or one compensation) and every attempt at it."""

    name: str
    phase: str  # forward | compensate
    status: str  # pending | running | waiting | done | failed
    attempts: int
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class SagaRunView:
    """A run as steps, `on_finish` and callers see it (read-only; a step changes the context by returning a dict).

    `current_step` is the name of the step (or compensation) the run is at, None once it has ended; `steps` is
    the step log in the order the rows were written: forward steps, then compensations in reverse order.
    """

    id: uuid.UUID
    name: str
    key: str
    status: str
    context: dict[str, Any]
    error: str | None
    current_step: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    steps: list[StepLogView] = field(default_factory=list)


StepAction = Callable[[SagaRunView], "dict[str, Any] | StepWait | None"]


@dataclass(frozen=True)
class SagaStep:
    """One step: `action(run)` does it, `compensate(run)` undoes it after a later step failed (None: nothing
    to undo). A transient error (any exception but `StepFailed`) is retried up to `max_attempts` executions.

    Both should only write to the database (they run inside the step's transaction): an effect outside it
    (an HTTP call, a message) can happen again if the transaction fails after it. Let the outside world
    receive such effects after commit (an outbox row, a task queued with `transaction.on_commit`).
    """

    name: str
    action: StepAction
    compensate: Callable[[SagaRunView], Any] | None = None
    max_attempts: int = 5

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"step {self.name}: max_attempts must be at least 1")


@dataclass(frozen=True)
class SagaDefinition:
    """A named sequence of steps. `on_finish(run)` is called inside the transaction that ends a run (status
    succeeded, compensated or cancelled), so the owner's own record of the outcome commits with it; if it
    raises, that transaction rolls back and is tried again later (a run never ends without it).

    Changing the steps of a definition while runs of it are active is not supported (runs store step
    positions): give the new sequence a new name.
    """

    name: str
    steps: list[SagaStep]
    on_finish: Callable[[SagaRunView], None] | None = None

    def __post_init__(self):
        if not self.steps:
            raise ValueError(f"saga {self.name}: at least one step")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga {self.name}: step names must be unique, got {names}")


class SagaKeyConflict(ServiceError):
    status_code = 409
    code = "saga_key_conflict"
    default_detail = "A run of this saga with this key is already in progress."


class SagaRunNotFound(ServiceError):
    status_code = 404
    code = "saga_run_not_found"
    default_detail = "No such saga run."


# Filled at start-up (AppConfig.ready of the owning apps), read-only afterwards.
_registry: dict[str, SagaDefinition] = {}


def saga_register(*, definition: SagaDefinition) -> None:
    """Make `definition` runnable in this process. Registering the same object again is a no-op; another
    definition under a taken name is a configuration error."""
    existing = _registry.setdefault(definition.name, definition)
    if existing is not definition:
        raise ImproperlyConfigured(f"a saga named {definition.name!r} is already registered")


def saga_definition_get(name: str) -> SagaDefinition:
    try:
        return _registry[name]
    except KeyError:
        raise LookupError(
            f"no saga named {name!r} is registered in this process (register it in its app's ready())"
        ) from None
