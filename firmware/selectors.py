"""Reads of the firmware app: releases, updates, what a device may see and download, rollouts' progress."""

import uuid
from dataclasses import dataclass
from datetime import datetime

from django.core.files import File
from django.core.files.storage import default_storage
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery

from firmware.models import (
    ACTIVE_STATUSES,
    ROLLOUT_ACTIVE_STATUSES,
    FirmwareRelease,
    FirmwareRollout,
    FirmwareRolloutStage,
    FirmwareUpdate,
    UpdateStatus,
)
from iot.saga import SagaRunNotFound, SagaRunView, saga_get


def release_get(*, version: str) -> FirmwareRelease | None:
    return FirmwareRelease.objects.filter(version=version).first()


def release_list() -> QuerySet[FirmwareRelease]:
    return FirmwareRelease.objects.all()


def update_get(*, update_id: uuid.UUID) -> FirmwareUpdate | None:
    return FirmwareUpdate.objects.filter(pk=update_id).first()


def update_list(
    *,
    device_id: uuid.UUID | None = None,
    status: str | None = None,
    active: bool | None = None,
    rollout_id: uuid.UUID | None = None,
) -> QuerySet[FirmwareUpdate]:
    updates = FirmwareUpdate.objects.all()
    if device_id is not None:
        updates = updates.filter(device_id=device_id)
    if rollout_id is not None:
        updates = updates.filter(rollout_id=rollout_id)
    if status is not None:
        updates = updates.filter(status=status)
    if active is not None:
        updates = updates.filter(status__in=ACTIVE_STATUSES) if active else updates.exclude(status__in=ACTIVE_STATUSES)
    return updates


def update_saga(*, update: FirmwareUpdate) -> SagaRunView | None:
    """The update's saga run with its step log (one query for the run, one for the log)."""
    if update.saga_run_id is None:
        return None
    try:
        return saga_get(run_id=update.saga_run_id)
    except SagaRunNotFound:
        return None


def _offered_to_device(device_id: uuid.UUID) -> QuerySet[FirmwareUpdate]:
    """The device's update that was dispatched to it and is still on offer (not cancelled, not withdrawn)."""
    return FirmwareUpdate.objects.filter(
        device_id=device_id,
        status__in=ACTIVE_STATUSES,
        cancelled_at=None,
        withdrawn_at=None,
        dispatched_at__isnull=False,
    )


def device_pending_update(*, device_id: uuid.UUID) -> FirmwareUpdate | None:
    """What `GET /firmware/device/update` offers the device, with its release; at most one (the unique
    index allows one active, uncancelled update per device). Also offered after the device reported its
    result, until the saga has settled it, so a device that retries its poll sees the same update."""
    return _offered_to_device(device_id).select_related("release").first()


def device_may_download(*, device_id: uuid.UUID, version: str) -> bool:
    """A device downloads the artifact of the release it has on offer, and no other."""
    return _offered_to_device(device_id).filter(to_version=version).exists()


def artifact_open(*, release: FirmwareRelease) -> File:
    """The release's artifact from storage, opened for reading (the caller closes it)."""
    return default_storage.open(release.artifact_name, "rb")


def firmware_update_active_count() -> int:
    """Updates not finished yet (the fleet's pending updates, for analytics): one count query."""
    return FirmwareUpdate.objects.filter(status__in=ACTIVE_STATUSES).count()


# --- Rollouts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutCounts:
    """Where a rollout's (or one stage's) targets are: the updates by status, the skipped targets, the rest
    not started yet.

    `success_rate`: installed / updates (rolled-back ones left out), the figure a stage's success threshold
    is compared with. `failure_rate`: failed / (installed + failed), the figure the error threshold is
    compared with (over the whole rollout). Both None while there is nothing to divide by.
    """

    targets: int
    skipped: int
    by_status: dict[str, int]

    def _n(self, status: str) -> int:
        return self.by_status.get(status, 0)

    @property
    def updates(self) -> int:
        return sum(self.by_status.values())

    @property
    def not_started(self) -> int:
        return max(self.targets - self.skipped - self.updates, 0)

    @property
    def installed(self) -> int:
        return self._n(UpdateStatus.INSTALLED)

    @property
    def failed(self) -> int:
        return self._n(UpdateStatus.FAILED)

    @property
    def rolled_back(self) -> int:
        return self._n(UpdateStatus.ROLLED_BACK)

    @property
    def in_flight(self) -> int:
        return sum(self._n(status) for status in ACTIVE_STATUSES)

    @property
    def done(self) -> int:
        """Targets the rollout is done with: their update ended, or they were skipped."""
        return self.installed + self.failed + self.rolled_back + self.skipped

    @property
    def success_rate(self) -> float | None:
        judged = self.updates - self.rolled_back
        return self.installed / judged if judged else None

    @property
    def failure_rate(self) -> float | None:
        finished = self.installed + self.failed
        return self.failed / finished if finished else None

    def as_dict(self) -> dict[str, int]:
        """Every status (0s included), `not_started` first and `skipped` last."""
        return {
            "not_started": self.not_started,
            **{status: self._n(status) for status in UpdateStatus.values},
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class StageProgress:
    index: int
    percent: float
    counts: RolloutCounts
    started_at: datetime | None
    passed_at: datetime | None

    @property
    def state(self) -> str:
        """waiting (not started), running, or passed (its success threshold was reached)."""
        if self.passed_at is not None:
            return "passed"
        return "running" if self.started_at is not None else "waiting"


@dataclass(frozen=True)
class RolloutProgress:
    counts: RolloutCounts
    stages: list[StageProgress]


@dataclass(frozen=True)
class RolloutSummary:
    """A rollout in progress, for the fleet dashboard."""

    id: uuid.UUID
    name: str
    to_version: str
    status: str
    current_stage: int
    stage_count: int
    counts: RolloutCounts
    created_at: datetime


def rollout_update_counts(*, rollout_id: uuid.UUID) -> dict[int, dict[str, int]]:
    """The rollout's updates counted by stage and status: {stage index: {status: n}}, ONE aggregate query
    (an index-only scan of `firmware_update_rollout`)."""
    rows = (
        FirmwareUpdate.objects.filter(rollout_id=rollout_id)
        .values_list("rollout_stage", "status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    counts: dict[int, dict[str, int]] = {}
    for stage, status, n in rows:
        counts.setdefault(stage, {})[status] = n
    return counts


def _count_name(status: str) -> str:
    return f"updates_{status}"


def _with_counts(rollouts: QuerySet[FirmwareRollout]) -> QuerySet[FirmwareRollout]:
    """Annotated with their updates' counts by status (`updates_<status>`): one GROUP BY query for a page."""
    return rollouts.annotate(
        **{_count_name(status): Count("updates", filter=Q(updates__status=status)) for status in UpdateStatus.values}
    )


def rollout_counts(rollout: FirmwareRollout) -> RolloutCounts:
    """The rollout's counts, from the annotations of `rollout_list`/`rollout_get` (else one query)."""
    if hasattr(rollout, _count_name(UpdateStatus.PENDING)):
        by_status = {status: getattr(rollout, _count_name(status)) for status in UpdateStatus.values}
    else:
        by_status = {}
        for stage_counts in rollout_update_counts(rollout_id=rollout.pk).values():
            for status, n in stage_counts.items():
                by_status[status] = by_status.get(status, 0) + n
    return RolloutCounts(targets=rollout.target_count, skipped=rollout.skipped_count, by_status=by_status)


def rollout_list(*, status: str | None = None) -> QuerySet[FirmwareRollout]:
    """Rollouts, newest first, with their update counts (one query a page) and stages (one more)."""
    rollouts = FirmwareRollout.objects.all()
    if status is not None:
        rollouts = rollouts.filter(status=status)
    return _with_counts(rollouts).prefetch_related("stages").order_by("-created_at", "-id")


def rollout_get(*, rollout_id: uuid.UUID) -> FirmwareRollout | None:
    return FirmwareRollout.objects.filter(pk=rollout_id).prefetch_related("stages").first()


def rollout_progress(*, rollout: FirmwareRollout) -> RolloutProgress:
    """The rollout's counts overall and per stage: one aggregate query (plus its stages, if not prefetched)."""
    counts = rollout_update_counts(rollout_id=rollout.pk)
    stages = sorted(rollout.stages.all(), key=lambda stage: stage.index)
    per_stage, start = [], 0
    for stage in stages:
        stage_counts = RolloutCounts(
            targets=stage.end_position - start, skipped=stage.skipped, by_status=counts.get(stage.index, {})
        )
        per_stage.append(
            StageProgress(
                index=stage.index,
                percent=stage.percent,
                counts=stage_counts,
                started_at=stage.started_at,
                passed_at=stage.passed_at,
            )
        )
        start = stage.end_position
    by_status: dict[str, int] = {}
    for stage_counts in counts.values():
        for status, n in stage_counts.items():
            by_status[status] = by_status.get(status, 0) + n
    overall = RolloutCounts(targets=rollout.target_count, skipped=rollout.skipped_count, by_status=by_status)
    return RolloutProgress(counts=overall, stages=per_stage)


def rollout_list_active() -> list[RolloutSummary]:
    """The running and paused rollouts with their counts, newest first, for the fleet dashboard: ONE query
    (the rollouts, their updates counted by status with a GROUP BY, their stage count a subquery)."""
    stage_count = Subquery(
        FirmwareRolloutStage.objects.filter(rollout=OuterRef("pk"))
        .order_by()
        .values("rollout")
        .annotate(n=Count("pk"))
        .values("n")
    )
    rollouts = (
        _with_counts(FirmwareRollout.objects.filter(status__in=ROLLOUT_ACTIVE_STATUSES))
        .annotate(stage_count=stage_count)
        .order_by("-created_at", "-id")  # Meta.ordering does not apply to a GROUP BY query
    )
    return [
        RolloutSummary(
            id=rollout.pk,
            name=rollout.name,
            to_version=rollout.to_version,
            status=rollout.status,
            current_stage=rollout.current_stage,
            stage_count=rollout.stage_count or 0,
            counts=rollout_counts(rollout),
            created_at=rollout.created_at,
        )
        for rollout in rollouts
    ]


def rollout_ids_unsettled() -> list[uuid.UUID]:
    """The rollouts with work left (running, paused, or updates still being cancelled), oldest first: what the
    beat advances. A partial index holds only these."""
    return list(FirmwareRollout.objects.filter(settled_at=None).order_by("created_at").values_list("pk", flat=True))
