"""The partitioned telemetry table.

The model is unmanaged (Django cannot express `PARTITION BY`), so this migration
owns the DDL: the parent table, its index (inherited by every partition) and the
DEFAULT partition. Daily partitions are created right after every `migrate`
(post_migrate, see apps.py), by the worker at start-up and by the beat schedule.
"""

from django.db import migrations, models

CREATE = """
CREATE TABLE telemetry_point (
    id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    device_id uuid NOT NULL,
    metric varchar(128) NOT NULL CHECK (metric <> ''),
    ts timestamptz NOT NULL,
    value double precision NOT NULL
        CHECK (value <> 'NaN'::float8 AND value <> 'Infinity'::float8 AND value <> '-Infinity'::float8),
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (ts);

CREATE INDEX telemetry_point_device_metric_ts ON telemetry_point (device_id, metric, ts DESC);

CREATE TABLE telemetry_point_default PARTITION OF telemetry_point DEFAULT;
"""

DROP = "DROP TABLE IF EXISTS telemetry_point CASCADE;"


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="TelemetryPoint",
            fields=[
                ("id", models.BigIntegerField(editable=False, primary_key=True, serialize=False)),
                ("device_id", models.UUIDField()),
                ("metric", models.CharField(max_length=128)),
                ("ts", models.DateTimeField(help_text="When the device measured the value (UTC).")),
                ("value", models.FloatField()),
                ("received_at", models.DateTimeField(help_text="When the platform stored the point.")),
            ],
            options={
                "verbose_name": "telemetry point",
                "db_table": "telemetry_point",
                "ordering": ("-ts",),
                "managed": False,
            },
        ),
        migrations.RunSQL(CREATE, reverse_sql=DROP),
    ]
