"""Stored response bodies become encrypted: add the encrypted column, encrypt what is kept, drop the clear one.

Keys stored before this migration still replay (their bodies are encrypted here
with the configured key, in batches of 1000 rows by id), so a retry that spans
the deploy is still answered with its first response. The same UPDATE clears the
clear column: a dropped column's values would otherwise stay in the rows on disk.
Reversible: going back decrypts into the clear column again.
"""

from django.db import migrations, models

BATCH = 1000


def _table(apps) -> str:
    return apps.get_model("idempotency", "IdempotencyKey")._meta.db_table


def encrypt_stored_bodies(apps, schema_editor):
    from iot.idempotency.crypto import response_body_encrypt

    Key = apps.get_model("idempotency", "IdempotencyKey")
    last_id = 0
    while True:
        rows = list(
            Key.objects.filter(id__gt=last_id, response_body__isnull=False)
            .order_by("id")
            .values_list("id", "response_body")[:BATCH]
        )
        if not rows:
            return
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {_table(apps)} AS k SET response_body_encrypted = v.body, response_body = NULL"
                " FROM unnest(%s::bigint[], %s::bytea[]) AS v(id, body) WHERE k.id = v.id",
                [[row_id for row_id, _ in rows], [response_body_encrypt(body=body) for _, body in rows]],
            )
        last_id = rows[-1][0]


def decrypt_stored_bodies(apps, schema_editor):
    from iot.idempotency.crypto import response_body_decrypt

    Key = apps.get_model("idempotency", "IdempotencyKey")
    last_id = 0
    while True:
        rows = list(
            Key.objects.filter(id__gt=last_id, response_body_encrypted__isnull=False)
            .order_by("id")
            .values_list("id", "response_body_encrypted")[:BATCH]
        )
        if not rows:
            return
        for row_id, token in rows:
            Key.objects.filter(id=row_id).update(response_body=response_body_decrypt(token=token))
        last_id = rows[-1][0]


class Migration(migrations.Migration):
    dependencies = [("idempotency", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="idempotencykey",
            name="response_body_encrypted",
            field=models.BinaryField(
                blank=True, editable=False, help_text="The response body as JSON, encrypted (Fernet).", null=True
            ),
        ),
        migrations.RunPython(encrypt_stored_bodies, decrypt_stored_bodies),
        migrations.RemoveField(model_name="idempotencykey", name="response_body"),
    ]
