import uuid

from django.db import models
from django.db.models import Q


class SagaStatus(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    CANCELLED = "cancelled"


# A run in one of these still has work to do (a step or a compensation); the others are final.
ACTIVE_STATUSES = (SagaStatus.RUNNING, SagaStatus.COMPENSATING)


class StepPhase(models.TextChoices):
    FORWARD = "forward"
    COMPENSATE = "compensate"


class StepStatus(models.TextChoices):
    PENDING = "pending"
    # Only ever seen inside the step's own transaction: a step runs and commits its outcome in one transaction,
    # so other readers see it pending (not yet run, or a transient failure to retry), then waiting/done/failed.
    RUNNING = "running"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"


class SagaRun(models.Model):
    """One run of a registered saga: where it is and when its next step is due.

    The row is the run's lock: a step (or compensation) executes inside a transaction that holds it
    `FOR UPDATE`, and commits its effects, its step-log row and this row's move to the next step together
    (see `iot.saga.runner`). `next_run_at` is when the current step is due (now, a retry's backoff, a
    `StepWait` deadline); `lease_expires_at` is when a task queued for it counts as lost, so the sweeper
    queues another. `attempts` counts the current step's failed executions (for backoff and `max_attempts`).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, help_text="The registered definition's name.")
    key = models.CharField(max_length=255, help_text="Unique among the active runs of one definition.")
    status = models.CharField(max_length=16, choices=SagaStatus.choices, default=SagaStatus.RUNNING)
    context = models.JSONField(default=dict, blank=True)
    error = models.TextField(null=True, blank=True, help_text="Why the run failed or was cancelled.")
    step_index = models.PositiveSmallIntegerField(default=0, help_text="Position of the current step.")
    phase = models.CharField(max_length=16, choices=StepPhase.choices, default=StepPhase.FORWARD)
    waiting = models.BooleanField(default=False, help_text="The current step returned StepWait: a signal wakes it.")
    attempts = models.PositiveIntegerField(default=0, help_text="Failed executions of the current step.")
    next_run_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["name", "key"], condition=Q(status__in=ACTIVE_STATUSES), name="saga_run_active_key_unique"
            ),
        ]
        indexes = [
            # The sweeper's scan: only active runs, by due time.
            models.Index(fields=["next_run_at"], condition=Q(status__in=ACTIVE_STATUSES), name="saga_run_due_idx"),
            models.Index(fields=["name", "key"], name="saga_run_name_key_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.key} ({self.status})"


class SagaStepLog(models.Model):
    """One step (or one compensation) of a run: its outcome, how many executions it took, the last error.

    Written in the same transaction as the step's effects, so the log never claims a step that did not
    happen nor misses one that did. A row is inserted when its step becomes the run's current one, so
    the id order is the execution order.
    """

    # Indexed by the unique constraint below (run first).
    run = models.ForeignKey(SagaRun, on_delete=models.CASCADE, related_name="step_logs", db_index=False)
    index = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=100)
    phase = models.CharField(max_length=16, choices=StepPhase.choices)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text="Executions of the step, waits included.")
    error = models.TextField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "index", "phase"], name="saga_step_log_unique_per_run"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.phase}, {self.status})"
