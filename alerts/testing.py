"""The alerts app's part of the test kit: rules made through the service, and points evaluated as
ingestion evaluates them (the shared part is `iot/testing/`, which imports no domain app)."""

import uuid
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.utils import timezone

from alerts.models import AlertRule
from alerts.services import EvaluationResult, alert_rule_create, alerts_evaluate
from telemetry.services import PointColumns, telemetry_points_ingest

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def rule_create(
    *,
    device_id: uuid.UUID | None = None,
    group_id: str | None = None,
    metric: str = "temperature",
    operator: str = "gt",
    threshold: float = 50.0,
    severity: str = "warning",
) -> AlertRule:
    return alert_rule_create(
        device_id=device_id, group_id=group_id, metric=metric, operator=operator, threshold=threshold, severity=severity
    )


def points_evaluate(
    *,
    device_id: uuid.UUID,
    values: list[float],
    metric: str = "temperature",
    group_id: str | None = None,
    timestamps: list[datetime] | None = None,
) -> EvaluationResult:
    """Evaluate points of one metric in a transaction of their own, as ingestion's transaction would
    (timestamps default to one second apart from `BASE_TIME`)."""
    if timestamps is None:
        timestamps = [BASE_TIME + timedelta(seconds=i) for i in range(len(values))]
    with transaction.atomic():
        return alerts_evaluate(
            device_id=device_id,
            group_id=group_id,
            metrics=[metric] * len(values),
            values=values,
            timestamps=timestamps,
        )


def points_ingest(*, device_id: uuid.UUID, values: list[float], metric: str = "temperature") -> None:
    """Store points through telemetry's ingestion service, as a request would: the insert statement
    reads the rule versions and the hook evaluates them (timestamps: the last seconds)."""
    now = timezone.now()
    timestamps = [now - timedelta(seconds=len(values) - i) for i in range(len(values))]
    telemetry_points_ingest(
        batch=PointColumns(device_id=device_id, metrics=[metric] * len(values), timestamps=timestamps, values=values)
    )
