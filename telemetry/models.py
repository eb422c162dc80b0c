from django.db import models

# The parent table and its naming scheme; the DDL lives in migrations/0001 and partitions.py.
TABLE = "telemetry_point"
DEFAULT_PARTITION = f"{TABLE}_default"
METRIC_MAX_LENGTH = 128


class TelemetryPoint(models.Model):
    """One measurement: `value` of `metric` on device `device_id` at time `ts`.

    Stored in `telemetry_point`, a table *declaratively partitioned by day* on `ts`
    (RANGE partitions `telemetry_point_pYYYYMMDD` plus a DEFAULT partition), so
    retention drops whole partitions instead of deleting rows, and time-range
    queries touch only the days they ask for. Django's schema editor cannot
    express `PARTITION BY`, so the model is unmanaged: migration 0001 creates the
    table with raw SQL and `partitions.telemetry_partitions_*` maintain the
    partitions. The model mirrors the columns so the ORM can read (and the admin
    list) points; writes go through `services.telemetry_points_ingest`, one
    multi-row INSERT per request.

    A point is identified by (device, metric, timestamp): the one b-tree index,
    UNIQUE `(device_id, metric, ts DESC)` (migration 0003; it contains the partition
    key, so it holds across partitions), serves "newest points of a device/metric",
    "latest point" and time-range scans, and the ingest INSERT's `ON CONFLICT DO
    NOTHING`: a point stored again (an MQTT QoS 1 redelivery, an HTTP retry without
    an Idempotency-Key, a repeat within a batch) is not, and its first value stays.
    `id` comes from an identity column and exists only because the ORM needs a
    primary key; it is not indexed (nothing looks a point up by id) and there is no
    foreign key to the device (the insert joins `devices_device` instead, which
    costs nothing per row).
    """

    id = models.BigIntegerField(primary_key=True, editable=False)
    device_id = models.UUIDField()
    metric = models.CharField(max_length=METRIC_MAX_LENGTH)
    ts = models.DateTimeField(help_text="When the device measured the value (UTC).")
    value = models.FloatField()
    received_at = models.DateTimeField(help_text="When the platform stored the point.")

    class Meta:
        managed = False
        db_table = TABLE
        ordering = ("-ts",)
        verbose_name = "telemetry point"

    def __str__(self) -> str:
        return f"{self.device_id} {self.metric}@{self.ts.isoformat()}={self.value}"


class DeviceMessageCount(models.Model):
    """A device's points received up to the reconciliation watermark, counted from Postgres.

    Written only by `telemetry.services.telemetry_message_counts_reconcile`, which adds
    each closed minute of `telemetry_point` (by `received_at`) exactly once, in the same
    transaction that moves the watermark (`MessageCountWatermark`). With the Redis
    counters of the minutes since the watermark, it gives exact message counts that no
    lost or repeated event can skew for longer than a minute or two. Counts are of points
    received, so they outlive the retention that drops old points.
    """

    device_id = models.UUIDField(primary_key=True)
    messages = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0.0, help_text="Sum over the points of received_at - timestamp.")

    def __str__(self) -> str:
        return f"{self.device_id}: {self.messages}"


class MessageCountWatermark(models.Model):
    """The one row saying up to when `DeviceMessageCount` is exact, and the fleet's totals up to then."""

    id = models.SmallIntegerField(primary_key=True, default=1, editable=False)
    reconciled_until = models.DateTimeField(null=True, help_text="Points received before this are counted.")
    messages = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return f"counted until {self.reconciled_until}"
