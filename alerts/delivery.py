"""Sending one notification through its channel's kind: a webhook POST or an email.

Both raise the same errors (`iot.outbound.OutboundError` and its kinds), so the outbox's
retry policy, the circuit breaker and the metrics treat every kind alike
(`alerts.services.notification_deliver_attempt`): a timeout or a refused connection is
retryable and counts against the breaker; a recipient the mail server refuses for good is
not retryable (a permanent failure, still retried until expiry in case the receiver is
fixed, but it says nothing about the server's health).

Email goes through Django's email backend (`EMAIL_URL`: `smtp://user:password@host:587`,
`smtp+tls://...`, or `consolemail://` to print), with `EMAIL_TIMEOUT_SECONDS` on the
connection. The message is plain text naming every alert, with the same JSON the webhook
gets attached, and `X-Notification-Id` (the outbox row's id) so a receiver can drop a repeat.
"""

import smtplib
import uuid

import orjson
from django.conf import settings
from django.core.mail import EmailMessage, get_connection

from alerts.models import NotificationChannelKind
from iot.outbound import OutboundConnectionError, OutboundError, OutboundRefused, OutboundTimeout, outbound_post


class EmailRecipientRefused(OutboundRefused):
    """The mail server refused every recipient: permanent, and no verdict on the server."""


def email_recipients(url: str) -> list[str]:
    """The addresses of a `mailto:a@example.com,b@example.com` channel URL (unvalidated)."""
    if not url.lower().startswith("mailto:"):
        return []
    return [address.strip() for address in url[len("mailto:") :].split(",") if address.strip()]


def notification_send(*, kind: str, url: str, body: bytes, notification_id: uuid.UUID) -> None:
    """Deliver `body` (the notification's JSON) to the channel, or raise an `OutboundError`."""
    if kind == NotificationChannelKind.EMAIL:
        _email(recipients=email_recipients(url), body=body, notification_id=notification_id)
        return
    outbound_post(url=url, body=body, headers={"Idempotency-Key": str(notification_id)})


def _email(*, recipients: list[str], body: bytes, notification_id: uuid.UUID) -> None:
    payload = orjson.loads(body)
    alerts = payload["alerts"]
    worst = max((alert["severity"] for alert in alerts), key=["info", "warning", "critical"].index)
    subject = f"[{worst}] {len(alerts)} alert{'s' if len(alerts) != 1 else ''} opened"
    lines = [
        f"- {alert['severity']}: {alert['metric']} = {alert['last_value']} on device {alert['device_id']} "
        f"(alert {alert['id']}, since {alert['first_triggered_at']})"
        for alert in alerts
    ]
    message = EmailMessage(
        subject=subject,
        body="New alerts:\n\n" + "\n".join(lines) + "\n",
        to=recipients,
        headers={"X-Notification-Id": str(notification_id)},
        connection=get_connection(timeout=settings.EMAIL_TIMEOUT_SECONDS),
    )
    message.attach("alerts.json", body, "application/json")
    try:
        message.send()
    except smtplib.SMTPRecipientsRefused as exc:
        raise EmailRecipientRefused(f"the mail server refused every recipient: {exc.recipients}") from exc
    except TimeoutError as exc:
        raise OutboundTimeout(f"the mail server did not answer in time: {exc}") from exc
    except (smtplib.SMTPException, OSError) as exc:
        raise OutboundConnectionError(f"sending the email failed: {type(exc).__name__}: {exc}") from exc


__all__ = ["OutboundError", "email_recipients", "notification_send"]
