"""Helpers for the process-supervision tests: the runner's children and a steady HTTP load.

`scripts/platform.py worker` runs its children (Celery main, `events-N` consumers) as direct
children of the runner process; `children_matching` finds them by command line, which is how an
operator would find them with `ps` too.
"""

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import psutil

CONSUMER = "run_event_consumers"
CELERY = "celery"


def children_matching(runner_pid: int, marker: str) -> dict[int, psutil.Process]:
    """The runner's live direct children whose command line contains `marker`, by pid."""
    found = {}
    for child in psutil.Process(runner_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and marker in " ".join(child.cmdline()):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return found


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan reaped late by init would still show up as one)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Answer:
    at: float  # time.monotonic() when the request was sent
    status: int  # 0: no HTTP answer (connection refused, reset, timeout)


@dataclass
class PointLoad:
    """`clients` threads each sending single telemetry points for one device in a loop until `stop()`.

    Every request and its answer is kept with the time it was sent, so a test can count what was
    sent and refused in any interval (e.g. between a kill and the restart).
    """

    base_url: str
    token: str
    device_id: str
    clients: int = 4
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> "PointLoad":
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        headers = {"Authorization": f"Token {self.token}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=30) as client:
            while not self._stop.is_set():
                body = {
                    "device_id": self.device_id,
                    "timestamp": datetime.now(UTC).isoformat(),
                    "metric": "supervision",
                    "value": float(uuid.uuid4().int % 1000),
                }
                sent = time.monotonic()
                try:
                    status = client.post("/telemetry/point", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.answers.append(Answer(at=sent, status=status))

    def between(self, start: float, end: float) -> list[Answer]:
        with self._lock:
            return [answer for answer in self.answers if start <= answer.at <= end]

    def accepted(self) -> int:
        with self._lock:
            return sum(answer.status == 202 for answer in self.answers)

    def refused(self) -> list[Answer]:
        """Everything but a 202: a 4xx/5xx or no answer at all."""
        with self._lock:
            return [answer for answer in self.answers if answer.status != 202]
