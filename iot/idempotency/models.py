from django.db import models


class IdempotencyKey(models.Model):
    """The outcome of one request made with an `Idempotency-Key` header.

    A row is inserted (inside the request's transaction) before the work runs
    and completed with the response in the same transaction, so a key is either
    absent, in flight (row locked by an open transaction) or done - never done
    without the work, nor the work without the key. `scope` ties a key to the
    caller and the endpoint, so two clients can't collide or replay each
    other's responses. The response body is stored encrypted (`crypto.py`): it
    may carry a secret that the client was shown once.
    """

    scope = models.CharField(max_length=255, help_text="Caller, method and path the key belongs to.")
    key = models.CharField(max_length=255)
    request_fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the canonical request body.")
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body_encrypted = models.BinaryField(
        null=True, blank=True, editable=False, help_text="The response body as JSON, encrypted (Fernet)."
    )
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="idempotency_key_unique_per_scope")]

    def __str__(self) -> str:
        return f"{self.scope} {self.key}"
