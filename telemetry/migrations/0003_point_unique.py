"""A telemetry point is identified by (device_id, metric, ts): storing it again is a no-op.

MQTT's QoS 1 redelivers a message whose PUBACK was lost, and an HTTP client without an
`Idempotency-Key` retries a request whose answer it never saw; either must not store a
point twice. The index `(device_id, metric, ts DESC)` becomes UNIQUE (same columns, same
order, so every read keeps its plan) and the ingest INSERT says `ON CONFLICT DO NOTHING`
(`telemetry.services`). A unique index on a partitioned table must contain the partition
key; `ts` is in it, so uniqueness per partition is uniqueness of the whole table.

Created on the parent, the index is built for every partition that exists (the DEFAULT
one included), and a partition attached later gets its own at ATTACH
(`telemetry.partitions._create_partition` creates a bare table and attaches it; the rows
it moves from DEFAULT are unique there already).

One transaction: the table is locked against writes (`SHARE ROW EXCLUSIVE`: reads go on,
ingestion waits) so that no duplicate can arrive between the clean-up and the index build;
then the duplicates stored so far are deleted, keeping the first stored of each (earliest
`received_at`, then `id`: the row `DO NOTHING` would have kept); then the unique index is
built and the old one dropped (its ACCESS EXCLUSIVE lock lasts until the commit, which
follows at once). The DEFAULT partition is locked first, in the order partition
maintenance takes its locks (DEFAULT, then the parent), so the two cannot deadlock.
Measured on 1 000 000 points over 8 day partitions with 1% duplicated (2 loaded cores,
Postgres 15): about 3 s, ingestion waiting meanwhile. Far larger tables would build the
index per partition with `CREATE INDEX CONCURRENTLY` and attach them to an index created
`ON ONLY` the parent instead; not needed at this project's retention (30 days).

Backwards: the plain index again; deleted duplicates are not restored.
"""

from django.db import migrations

OLD_INDEX = "telemetry_point_device_metric_ts"
NEW_INDEX = "telemetry_point_device_metric_ts_key"

# `tableoid, ctid` name a row exactly (`id` has no uniqueness constraint to rely on).
DELETE_DUPLICATES = """
DELETE FROM telemetry_point AS t
USING (
    SELECT tableoid, ctid
    FROM (
        SELECT tableoid, ctid,
               row_number() OVER (PARTITION BY device_id, metric, ts ORDER BY received_at, id) AS n
        FROM telemetry_point
    ) AS ranked
    WHERE n > 1
) AS extra
WHERE t.tableoid = extra.tableoid AND t.ctid = extra.ctid
"""

FORWARD = [
    "LOCK TABLE telemetry_point_default IN SHARE ROW EXCLUSIVE MODE",
    "LOCK TABLE telemetry_point IN SHARE ROW EXCLUSIVE MODE",
    DELETE_DUPLICATES,
    f"CREATE UNIQUE INDEX {NEW_INDEX} ON telemetry_point (device_id, metric, ts DESC)",
    f"DROP INDEX {OLD_INDEX}",
]

BACKWARD = [
    f"CREATE INDEX {OLD_INDEX} ON telemetry_point (device_id, metric, ts DESC)",
    f"DROP INDEX {NEW_INDEX}",
]


class Migration(migrations.Migration):
    dependencies = [
        ("telemetry", "0002_message_counts"),
    ]

    operations = [migrations.RunSQL(FORWARD, reverse_sql=BACKWARD)]
