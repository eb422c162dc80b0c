"""One simulated device: its telemetry (random walks) and the device side of a firmware update.

The device is a state machine driven in steps, so a test can drive it against a fake transport
without any clock: `telemetry_step()` sends once and `ota_step()` polls once (and carries on
through every report that needs no waiting), and each returns how many seconds to wait before
the next step (`None`: stop, e.g. the platform no longer accepts the device's credential).
`iot.simulator.fleet` runs the loops that sleep between steps.

Telemetry. Each step samples every metric once and sends them as one request (a batch, or a
single point for one metric). A 429/503 with `Retry-After` keeps the points and retries them
with the next sample after waiting that long (the buffer is capped at `max_buffered_points`,
oldest dropped and counted, below the platform's 100 points per device per window so a
retried batch never becomes `batch_exceeds_limit`). A request that may or may not have arrived
(timeout, reset, 5xx) is resent unchanged with the same `Idempotency-Key`, so it is stored once.

Firmware (the update's device side, as the platform's firmware API expects it):

    poll -> offer {update_id, to_version, artifact_url, checksum, install_allowed}
    report downloading -> download + SHA-256 check -> report downloaded
      (mismatch or a failed download -> report failed with the reason)
    poll until install_allowed -> report installing -> report installed {version: to_version}
      (a device planned to fail reports failed "simulated install failure" instead)

A device planned `silent` reports `downloading` and never reports on that update again.
An offer whose status says it got further (after a simulator restart) resumes at that point.
A report the server refuses for good (4xx other than 429) abandons the update on the device.
"""

import math
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from iot.simulator.transport import DeviceIdentity, Download, Reply, Transport, TransportError, checksum_expected_sha256

# What a device does with an update it is offered (chosen per device by the fleet, from the seed).
INSTALL = "install"
FAIL = "fail"
SILENT = "silent"
OTA_PLANS = (INSTALL, FAIL, SILENT)

# Final outcomes of one update as the device saw it.
INSTALLED = "installed"
FAILED = "failed"
WENT_SILENT = "silent"
ABANDONED = "abandoned"

INSTALL_FAILURE_REASON = "simulated install failure"
DEFAULT_METRICS = ("temperature", "humidity", "battery")

# Phases of the update a device is working on: what it does next.
_REPORT_DOWNLOADING = "report_downloading"
_DOWNLOAD = "download"
_REPORT_DOWNLOADED = "report_downloaded"
_AWAIT_INSTALL = "await_install"
_REPORT_INSTALLING = "report_installing"
_REPORT_RESULT = "report_result"
_REPORT_FAILED = "report_failed"

# Transport errors in a row on one download before the device gives the update up.
DOWNLOAD_ATTEMPTS = 3
# The platform keeps at most this much of a failure reason.
REASON_MAX_LENGTH = 1000
_OUTSIDE_WINDOW = "outside_maintenance_window"
# Update statuses after which the platform takes no more reports.
_ENDED_STATUSES = ("installed", "failed", "rolled_back")


@dataclass
class DeviceStats:
    """Counters of one device (points are counted per attempt: a point retried twice is sent twice)."""

    requests: int = 0
    points_sent: int = 0
    points_accepted: int = 0
    points_refused: int = 0  # in requests answered 429/503 (kept and retried)
    points_dropped: int = 0  # given up: buffer overflow, 429 without Retry-After
    points_rejected: int = 0  # refused for good (400/422...)
    refused_429: int = 0
    refused_503: int = 0
    backoff_seconds: float = 0.0
    transport_errors: int = 0
    server_errors: int = 0
    ota_polls: int = 0
    ota_refused: int = 0
    auth_failed: bool = False
    last_error: str | None = None


@dataclass
class ActiveUpdate:
    update_id: str
    to_version: str
    artifact_url: str | None
    checksum: str | None
    phase: str
    failure_reason: str | None = None
    download_errors: int = 0


@dataclass
class _Sensor:
    """Per-device random walks. Normal devices hover 18-28 C; `hot` ones climb ~1 C a step to ~75 C."""

    rng: random.Random
    hot: bool
    temperature: float = 0.0
    temperature_base: float = 0.0
    humidity: float = 0.0
    battery: float = 0.0

    def __post_init__(self):
        self.temperature_base = self.rng.uniform(20.0, 25.0)
        self.temperature = self.temperature_base
        self.humidity = self.rng.uniform(35.0, 60.0)
        self.battery = self.rng.uniform(60.0, 100.0)

    def sample(self, metric: str) -> float:
        rng = self.rng
        if metric == "temperature":
            if self.hot:
                target = 75.0
                step = rng.uniform(0.5, 1.5) if self.temperature < target else rng.gauss(0.0, 0.8)
                self.temperature += step
            else:
                # Mean-reverting walk around the device's own base.
                self.temperature += 0.2 * (self.temperature_base - self.temperature) + rng.gauss(0.0, 0.4)
                self.temperature = min(max(self.temperature, 18.0), 28.0)
            return round(self.temperature, 2)
        if metric == "humidity":
            self.humidity = min(max(self.humidity + rng.gauss(0.0, 1.0), 5.0), 95.0)
            return round(self.humidity, 2)
        if metric == "battery":
            self.battery -= rng.uniform(0.0, 0.1)
            if self.battery < 5.0:
                self.battery = 100.0  # recharged
            return round(self.battery, 2)
        return round(rng.gauss(50.0, 10.0), 3)


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SimulatedDevice:
    """A device of the fleet. Not thread-safe: one event loop drives it."""

    def __init__(
        self,
        *,
        identity: DeviceIdentity,
        group_id: str | None,
        firmware_version: str,
        hot: bool = False,
        ota_plan: str = INSTALL,
        seed: int | str = 0,
        interval: float = 5.0,
        jitter: float = 0.2,
        ota_poll_interval: float = 2.0,
        ota_idle_poll_interval: float | None = None,
        metrics: tuple[str, ...] = DEFAULT_METRICS,
        max_buffered_points: int = 60,
        idempotency: bool = True,
        timestamp=_utc_now_iso,
    ):
        if ota_plan not in OTA_PLANS:
            raise ValueError(f"ota_plan must be one of {OTA_PLANS}, not {ota_plan!r}")
        self.identity = identity
        self.group_id = group_id
        self.firmware_version = firmware_version
        self.hot = hot
        self.ota_plan = ota_plan
        self.interval = interval
        self.jitter = jitter
        self.ota_poll_interval = ota_poll_interval
        self.ota_idle_poll_interval = ota_poll_interval if ota_idle_poll_interval is None else ota_idle_poll_interval
        self.metrics = tuple(metrics)
        self.max_buffered_points = max_buffered_points
        self.idempotency = idempotency
        self.rng = random.Random(f"{seed}:{identity.serial_number}")
        self.sensor = _Sensor(rng=random.Random(f"{seed}:{identity.serial_number}:sensor"), hot=hot)
        self.stats = DeviceStats()
        self.update: ActiveUpdate | None = None
        self.updates: dict[str, str] = {}  # update id -> final outcome (INSTALLED, FAILED, WENT_SILENT, ABANDONED)
        self.update_reasons: dict[str, str] = {}  # update id -> why it failed or was abandoned
        self.stopped = False
        self._timestamp = timestamp
        self._pending: list[dict] = []
        self._inflight: tuple[str | None, list[dict]] | None = None

    # ----------------------------------------------------------------- timing

    def jittered(self, seconds: float) -> float:
        """`seconds` +/- `jitter` (a fraction), so devices started together drift apart."""
        if seconds <= 0:
            return 0.0
        return seconds * (1.0 + self.rng.uniform(-self.jitter, self.jitter))

    def _retry_delay(self, reply: Reply | Download, fallback: float) -> float:
        if reply.retry_after is None:
            return self.jittered(fallback)
        # Never earlier than asked; a little later so a refused fleet does not come back in one burst.
        return reply.retry_after * (1.0 + self.rng.uniform(0.0, 0.2))

    def _poll_delay(self) -> float:
        return self.jittered(self.ota_poll_interval if self.update is not None else self.ota_idle_poll_interval)

    def _fail_auth(self, status: int) -> None:
        self.stats.auth_failed = True
        self.stats.last_error = f"HTTP {status}: the platform does not accept this device's token"
        self.stopped = True

    # -------------------------------------------------------------- telemetry

    def sample(self) -> list[dict]:
        now = self._timestamp()
        return [{"timestamp": now, "metric": metric, "value": self.sensor.sample(metric)} for metric in self.metrics]

    def _buffer(self, points: list[dict]) -> None:
        self._pending.extend(points)
        overflow = len(self._pending) - self.max_buffered_points
        if overflow > 0:
            del self._pending[:overflow]
            self.stats.points_dropped += overflow

    async def telemetry_step(self, transport: Transport) -> float | None:
        """Sample, send once, and return the delay before the next step (None: stop)."""
        if self.stopped:
            return None
        stats = self.stats
        if self._inflight is None:
            self._buffer(self.sample())
            points, self._pending = self._pending, []
            self._inflight = (str(uuid.uuid4()) if self.idempotency else None, points)
        else:
            # The last request may have been stored: resend it unchanged (same key); new samples wait.
            self._buffer(self.sample())
        key, points = self._inflight
        stats.requests += 1
        stats.points_sent += len(points)
        try:
            reply = await transport.send_points(self.identity, points, idempotency_key=key)
        except TransportError as exc:
            stats.transport_errors += 1
            stats.last_error = f"telemetry: {exc}"
            return self.jittered(self.interval)
        if reply.ok:
            stats.points_accepted += len(points)
            self._inflight = None
            return self.jittered(self.interval)
        if reply.refused_for_now:
            stats.points_refused += len(points)
            if reply.status == 429:
                stats.refused_429 += 1
            else:
                stats.refused_503 += 1
            self._inflight = None
            if reply.retry_after is None:
                # 429 batch_exceeds_limit: it can never pass as it is.
                stats.points_dropped += len(points)
                return self.jittered(self.interval)
            self._pending[:0] = points
            self._buffer([])
            delay = self._retry_delay(reply, self.interval)
            stats.backoff_seconds += delay
            return delay
        if reply.status in (401, 403):
            self._fail_auth(reply.status)
            return None
        if reply.status >= 500:
            stats.server_errors += 1
            stats.last_error = f"telemetry: HTTP {reply.status}"
            return self.jittered(self.interval)  # resent with the same key
        stats.points_rejected += len(points)
        stats.last_error = f"telemetry: HTTP {reply.status} {str(reply.body)[:200]}"
        self._inflight = None
        return self.jittered(self.interval)

    # ---------------------------------------------------------------- firmware

    def _finish(self, outcome: str, reason: str | None = None) -> None:
        assert self.update is not None
        self.updates[self.update.update_id] = outcome
        if reason:
            self.update_reasons[self.update.update_id] = reason
        self.update = None

    def _adopt(self, offer: dict) -> None:
        """Start on a newly offered update, or resume where the platform says it got to."""
        status = offer.get("status") or "pending"
        self.update = ActiveUpdate(
            update_id=str(offer["update_id"]),
            to_version=str(offer["to_version"]),
            artifact_url=offer.get("artifact_url"),
            checksum=offer.get("checksum"),
            phase={
                "downloading": _DOWNLOAD,
                "downloaded": _AWAIT_INSTALL,
                "installing": _REPORT_RESULT,
            }.get(status, _REPORT_DOWNLOADING),
        )
        if self.ota_plan == SILENT and self.update.phase != _REPORT_DOWNLOADING:
            self._finish(WENT_SILENT)  # it already said `downloading` in an earlier life

    async def _report(self, transport: Transport, body: dict) -> Reply | None:
        """Send a report; None when it did not land (try again later), else the reply."""
        assert self.update is not None
        try:
            reply = await transport.report(self.identity, self.update.update_id, body)
        except TransportError as exc:
            self.stats.transport_errors += 1
            self.stats.last_error = f"report {body['status']}: {exc}"
            return None
        if reply.ok:
            ended = reply.body.get("status") if isinstance(reply.body, dict) else None
            if ended in _ENDED_STATUSES and ended != body["status"]:
                # Reports are idempotent: a late one is answered 200 with the update's state, which may
                # say the platform ended it meanwhile (cancelled, rolled back, failed on its side).
                self._finish(ABANDONED, f"the platform ended the update: {ended} {reply.body.get('error') or ''}")
                return None
            return reply
        if reply.status == 409 and isinstance(reply.body, dict) and reply.body.get("code") == _OUTSIDE_WINDOW:
            self.update.phase = _AWAIT_INSTALL  # may not install now: wait for install_allowed again
            self.stats.ota_refused += 1
            return None
        if reply.refused_for_now or reply.status >= 500:
            self.stats.ota_refused += 1
            return None
        if reply.status == 401:
            self._fail_auth(reply.status)
            return None
        # The platform will not take this report (update cancelled, ended, unknown): give it up.
        reason = f"report {body['status']} refused: HTTP {reply.status} {str(reply.body)[:200]}"
        self.stats.last_error = reason
        self._finish(ABANDONED, reason)
        return None

    async def _download(self, transport: Transport) -> Download | None:
        update = self.update
        assert update is not None
        if not update.artifact_url:
            update.failure_reason = "no artifact_url in the update"
            return None
        try:
            result = await transport.download(self.identity, update.artifact_url)
        except TransportError as exc:
            self.stats.transport_errors += 1
            update.download_errors += 1
            if update.download_errors >= DOWNLOAD_ATTEMPTS:
                update.failure_reason = f"download failed: {exc}"
            return None
        return result

    def _verify(self, result: Download) -> str | None:
        """Why the artifact is not the release's (None: it is)."""
        update = self.update
        assert update is not None
        expected = checksum_expected_sha256(update.checksum or "")
        if expected is None:
            return f"unsupported checksum {update.checksum!r}"
        if result.sha256 != expected:
            return f"checksum mismatch: expected sha256 {expected}, got {result.sha256} ({result.size} bytes)"
        return None

    async def ota_step(self, transport: Transport) -> float | None:
        """Poll once and advance the current update as far as it goes without waiting.

        Returns the delay before the next poll (None: stop).
        """
        if self.stopped:
            return None
        stats = self.stats
        stats.ota_polls += 1
        try:
            reply = await transport.poll_update(self.identity)
        except TransportError as exc:
            stats.transport_errors += 1
            stats.last_error = f"poll: {exc}"
            return self._poll_delay()
        if reply.refused_for_now:
            stats.ota_refused += 1
            return self._retry_delay(reply, self.ota_poll_interval)
        if reply.status in (401, 403):
            self._fail_auth(reply.status)
            return None
        if reply.status == 204 or (reply.ok and not reply.body):
            if self.update is not None and self.update.phase == _AWAIT_INSTALL:
                self._finish(ABANDONED, "the platform stopped offering the update")
            return self._poll_delay()
        if not reply.ok:
            stats.server_errors += 1
            stats.last_error = f"poll: HTTP {reply.status} {str(reply.body)[:200]}"
            return self._poll_delay()
        offer = reply.body
        if not isinstance(offer, dict) or "update_id" not in offer or "to_version" not in offer:
            stats.last_error = f"poll: unexpected offer {str(offer)[:200]}"
            return self._poll_delay()
        update_id = str(offer["update_id"])
        if update_id in self.updates:
            return self._poll_delay()  # already done with it (or silent about it)
        if self.update is None or self.update.update_id != update_id:
            if self.update is not None:
                self._finish(ABANDONED, f"superseded by update {update_id}")
            self._adopt(offer)
        await self._advance(transport, install_allowed=bool(offer.get("install_allowed", True)))
        return self._poll_delay()

    async def _advance(self, transport: Transport, *, install_allowed: bool) -> None:
        while self.update is not None and not self.stopped:
            update = self.update
            phase = update.phase
            if phase == _REPORT_DOWNLOADING:
                if await self._report(transport, {"status": "downloading", "progress": 0}) is None:
                    return
                if self.ota_plan == SILENT:
                    self._finish(WENT_SILENT)
                    return
                update.phase = _DOWNLOAD
            elif phase == _DOWNLOAD:
                result = await self._download(transport)
                if result is None:
                    if update.failure_reason is None:
                        return  # try again next poll
                    update.phase = _REPORT_FAILED
                elif result.status in (429, 503) or result.status >= 500:
                    self.stats.ota_refused += 1
                    return
                elif result.status != 200:
                    update.failure_reason = f"download failed: HTTP {result.status}"
                    update.phase = _REPORT_FAILED
                else:
                    update.failure_reason = self._verify(result)
                    update.phase = _REPORT_FAILED if update.failure_reason else _REPORT_DOWNLOADED
            elif phase == _REPORT_DOWNLOADED:
                if await self._report(transport, {"status": "downloaded", "progress": 100}) is None:
                    return
                update.phase = _AWAIT_INSTALL
                return  # the platform decides when to install: poll again
            elif phase == _AWAIT_INSTALL:
                if not install_allowed:
                    return
                update.phase = _REPORT_INSTALLING
            elif phase == _REPORT_INSTALLING:
                if await self._report(transport, {"status": "installing"}) is None:
                    return
                update.phase = _REPORT_RESULT
            elif phase == _REPORT_RESULT:
                if self.ota_plan == FAIL:
                    update.failure_reason = INSTALL_FAILURE_REASON
                    update.phase = _REPORT_FAILED
                    continue
                if await self._report(transport, {"status": "installed", "version": update.to_version}) is None:
                    return
                self.firmware_version = update.to_version
                self._finish(INSTALLED)
            elif phase == _REPORT_FAILED:
                reason = (update.failure_reason or "failed")[:REASON_MAX_LENGTH]
                if await self._report(transport, {"status": "failed", "reason": reason}) is None:
                    return
                self._finish(FAILED, reason)
            else:  # pragma: no cover - phases are closed
                raise AssertionError(phase)


def expected_count(rate: float, total: int) -> int:
    """How many of `total` devices a rate selects (half rounds up, so 0.5 of 5 is 3)."""
    return min(total, math.floor(rate * total + 0.5))
