"""`manage.py run_event_consumers`: one event-queue consumer loop in this process.

`scripts/platform.py worker` starts `EVENT_BUS_WORKER_COUNT` of these next to the
Celery worker. Each process joins the consumer group under its own name
(hostname-pid), reads batches with XREADGROUP, and every `--claim-interval`
seconds reclaims entries left pending too long by any consumer (see
`iot.event_queue`). SIGTERM/SIGINT stop the loop after the current batch.
"""

import logging
import signal
import time

import redis
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from iot import event_queue

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Consume the event queue (one consumer loop; run several processes for more)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--batch", type=int, default=100, help="Entries per read (default 100).")
        parser.add_argument("--block-ms", type=int, default=1000, help="Longest wait for new entries (default 1000).")
        parser.add_argument(
            "--claim-idle-ms",
            type=int,
            default=None,
            help="Reclaim entries pending longer than this (default EVENT_QUEUE_CLAIM_IDLE_MS, 30000).",
        )
        parser.add_argument(
            "--claim-interval", type=float, default=5.0, help="Seconds between reclaim passes (default 5)."
        )
        parser.add_argument(
            "--handler-module",
            action="append",
            default=[],
            help="Extra module registering @event_handler functions (repeatable).",
        )
        parser.add_argument("--name", default="", help="Consumer name (default hostname-pid).")

    def handle(self, *args, **options) -> None:
        stopping = False

        def stop(signum, frame) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

        types = event_queue.load_event_handlers(extra_modules=options["handler_module"])
        name = options["name"] or event_queue.consumer_name()
        batch = max(1, options["batch"])
        block_ms = max(1, options["block_ms"])
        claim_idle_ms = options["claim_idle_ms"]
        claim_interval = max(0.05, options["claim_interval"])
        event_queue.ensure_consumer_group()
        self.stdout.write(f"event consumer {name} handling {', '.join(types) or 'nothing'}", ending="\n")
        self.stdout.flush()

        next_claim = time.monotonic()
        backoff = 0.0
        while not stopping:
            close_old_connections()
            try:
                if time.monotonic() >= next_claim:
                    self._reclaim(name=name, batch=batch, idle_ms=claim_idle_ms, stopping=lambda: stopping)
                    next_claim = time.monotonic() + claim_interval
                if not stopping:
                    event_queue.event_queue_consume(consumer=name, count=batch, block_ms=block_ms)
                backoff = 0.0
            except (redis.ConnectionError, redis.TimeoutError):
                # Redis is unreachable: keep the process (and its siblings) alive and retry, paced.
                backoff = min(max(backoff * 2, 0.1), 5.0)
                logger.exception("event consumer %s lost Redis; retrying in %.1fs", name, backoff)
                time.sleep(backoff)
            finally:
                close_old_connections()
        self.stdout.write(f"event consumer {name} stopped", ending="\n")

    @staticmethod
    def _reclaim(*, name: str, batch: int, idle_ms: int | None, stopping) -> None:
        """One pass over the whole pending list, a batch at a time."""
        cursor = "0-0"
        while not stopping():
            report = event_queue.event_queue_reclaim(consumer=name, min_idle_ms=idle_ms, count=batch, start_id=cursor)
            cursor = report.next_id
            if cursor == "0-0":
                break
        event_queue.prune_idle_consumers()
