"""The base of every refusal a service raises, carrying its HTTP meaning.

A service knows why it refuses (a rate limit, a full queue, an unknown device) and so
what the caller should do about it: wait `Retry-After` seconds, split a batch, fix a
field. It says so on the exception, and `iot.api.exceptions.api_exception_handler`
is the one place that turns any `ServiceError` into a response. Views then only
parse, authorize and call one service; a new domain (alerts, firmware) raises its
`409` instead of writing another translation.

Nothing here depends on DRF or Django: a Celery task or a management command can
raise and catch the same exceptions, and read `status_code` as "how final is this".

A refusal is raised, never returned: inside an `Idempotency-Key` transaction a raise
rolls the key's claim back, so a refused request is tried afresh by its retry.
"""

from typing import Any


class ServiceError(Exception):
    """A service refused; nothing was stored because of it.

    Class attributes a subclass sets (an instance may override them, e.g. a status
    that depends on how full a queue is):

    * `status_code`: the HTTP status;
    * `code`: a machine-readable kind of refusal, put in the body as `code` where
      clients act on it (`None`: the body has `detail` alone);
    * `field`: set when the refusal is about one input field: the body is then
      `{field: [detail]}`, the shape of a validation error, so a client shows it
      next to that field;
    * `default_detail`: the message when none is given.

    Instance attributes: `detail` (the message, also `str(exc)`), `headers`
    (e.g. `Retry-After`, `X-RateLimit-*`) and `fields` (extra body members, e.g.
    the `limit` a batch exceeded).
    """

    status_code: int = 400
    code: str | None = None
    field: str | None = None
    default_detail: str = "The request was refused."

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None, **fields: Any) -> None:
        self.detail = detail if detail is not None else self.default_detail
        super().__init__(self.detail)
        self.headers = headers or {}
        self.fields = fields

    def body(self) -> dict[str, Any]:
        """The response body (see the class docstring for its two shapes)."""
        if self.field is not None:
            return {self.field: [self.detail]}
        body: dict[str, Any] = {"detail": self.detail}
        if self.code is not None:
            body["code"] = self.code
        body.update(self.fields)
        return body
