"""Email channels: delivered through Django's SMTP backend to a real SMTP server, with the outbox's retries."""

import email
import threading
import uuid

import pytest
from aiosmtpd.controller import Controller
from django.utils import timezone
from rest_framework.test import APIClient

from alerts import services
from alerts.models import Notification
from alerts.services import alert_rule_create, notification_channel_create, notification_deliver_attempt
from alerts.testing import points_evaluate
from devices.testing import device_create
from iot.circuit_breaker import breaker_state
from iot.testing.factories import operator_token_create
from iot.testing.processes import free_port
from iot.testing.webhook import refused_url

pytestmark = pytest.mark.django_db(transaction=True)


class Mailbox:
    """An SMTP server (aiosmtpd) that keeps what it receives, or refuses every recipient."""

    def __init__(self):
        self.messages: list[email.message.Message] = []
        self.refuse = False
        self.lock = threading.Lock()
        mailbox = self

        class Handler:
            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
                if mailbox.refuse:
                    return "550 no such user here"
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):
                with mailbox.lock:
                    mailbox.messages.append(email.message_from_bytes(envelope.content))
                return "250 Message accepted for delivery"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()


@pytest.fixture
def mailbox(settings):
    box = Mailbox()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"  # pytest-django's default is locmem
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", box.port
    settings.EMAIL_TIMEOUT_SECONDS = 2.0
    settings.CIRCUIT_BREAKER_FAILURE_THRESHOLD = 2
    yield box
    box.controller.stop()


@pytest.fixture
def queued(monkeypatch):
    ids: list[uuid.UUID] = []
    monkeypatch.setattr(services, "_notifications_queue", lambda notification_ids: ids.extend(notification_ids))
    return ids


def open_alert(channel) -> Notification:
    device = device_create(serial_prefix="MAIL").device
    alert_rule_create(
        device_id=device.pk,
        metric="temperature",
        operator="gt",
        threshold=50.0,
        severity="critical",
        channel_ids=[channel.pk],
    )
    points_evaluate(device_id=device.pk, values=[75.0])
    return Notification.objects.get(channel=channel)


def test_an_alert_is_emailed_once_with_its_alerts(mailbox, queued):
    channel = notification_channel_create(name="ops", kind="email", url="mailto:ops@example.com,oncall@example.com")
    notification = open_alert(channel)
    assert notification_deliver_attempt(notification_id=notification.pk).outcome == "delivered"
    assert notification_deliver_attempt(notification_id=notification.pk).outcome == "skipped"
    (message,) = mailbox.messages
    assert message["Subject"] == "[critical] 1 alert opened"
    assert message["X-Notification-Id"] == str(notification.pk)
    assert message["To"] == "ops@example.com, oncall@example.com"
    text = message.get_payload()[0].get_payload(decode=True).decode()
    assert str(notification.alert_ids[0]) in text and "temperature = 75.0" in text


def test_a_mail_server_that_is_down_is_retried_and_trips_the_breaker(mailbox, queued, settings):
    channel = notification_channel_create(name="ops", kind="email", url="mailto:ops@example.com")
    notification = open_alert(channel)
    settings.EMAIL_PORT = int(refused_url().rsplit(":", 1)[1].split("/")[0])  # nothing listens there
    for _ in range(2):
        result = notification_deliver_attempt(notification_id=notification.pk)
        assert result.outcome == "failed" and result.retry_in_seconds > 0
        Notification.objects.filter(pk=notification.pk).update(next_attempt_at=timezone.now())
    assert breaker_state(name=f"channel:{channel.pk}") == "open"
    assert notification_deliver_attempt(notification_id=notification.pk).outcome == "held"
    assert mailbox.messages == []
    notification.refresh_from_db()
    assert notification.status == "pending" and notification.attempts == 2  # held, not dropped


def test_refused_recipients_fail_without_tripping_the_breaker(mailbox, queued):
    channel = notification_channel_create(name="ops", kind="email", url="mailto:nobody@example.com")
    notification = open_alert(channel)
    mailbox.refuse = True
    for _ in range(3):
        assert notification_deliver_attempt(notification_id=notification.pk).outcome == "failed"
        Notification.objects.filter(pk=notification.pk).update(next_attempt_at=timezone.now())
    assert breaker_state(name=f"channel:{channel.pk}") == "closed"
    mailbox.refuse = False
    assert notification_deliver_attempt(notification_id=notification.pk).outcome == "delivered"
    assert len(mailbox.messages) == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ops@example.com", "mailto:"),
        ("mailto:", "mailto:"),
        ("mailto:not-an-address", "Not an email address"),
        ("mailto:ok@example.com,bad", "Not an email address"),
    ],
)
def test_bad_email_channels_are_refused_with_a_reason(url, message):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {operator_token_create().key}")
    response = client.post("/alerts/channels", {"name": "ops", "kind": "email", "url": url}, format="json")
    assert response.status_code == 400, response.content
    assert message in str(response.json())
    ok = client.post("/alerts/channels", {"name": "ops", "kind": "email", "url": "mailto:a@example.com"}, format="json")
    assert ok.status_code == 201 and ok.json()["kind"] == "email"
