"""A fleet of simulated devices played against a running platform, as a library and for the CLI.

    fleet = FleetSimulator(base_url="http://127.0.0.1:8000", operator_token=key, devices=50,
                           groups=5, failure_rate=0.1, silence_rate=0.1, seed=7)
    fleet.register()                      # POST /devices for each (idempotent; tokens in state_path)
    stats = fleet.run(duration=30)        # telemetry + OTA polling for 30 s
    ok = fleet.run_until(lambda s: s.updates_ended >= 50, timeout=120)
    with fleet.running():                 # or in a background thread while a test drives the API
        ...
    fleet.stats().as_dict()

The plan is deterministic for a seed: which devices run hot (`alert_rate`), which fail their
updates (`failure_rate`) and which go silent (`silence_rate`) are exactly round(rate * N)
devices picked by a seeded shuffle (failing and silent sets are disjoint), and each device's
jitter and random walks come from its own seeded generator.

Load: each device runs two tasks (telemetry every `interval` s, OTA poll every
`ota_poll_interval` s while it works on an update and every `ota_idle_poll_interval` s (default:
the same) otherwise, all jittered, first ones spread over a whole period so a fleet does not
start in one burst) on one event loop, sharing one HTTP pool of `max_connections`.

Transports: `transport="http"` (the device API over HTTP) or `"mqtt"` (`mqtt_url`: one broker
connection per device, `iot.simulator.mqtt_transport`; artifacts and the offer a device missed
still over HTTP), or a factory returning any `Transport`.
"""

import asyncio
import hashlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iot.simulator.client import HttpTransport, Registration, async_client, device_register
from iot.simulator.device import (
    ABANDONED,
    DEFAULT_METRICS,
    FAIL,
    FAILED,
    INSTALL,
    INSTALLED,
    SILENT,
    WENT_SILENT,
    DeviceStats,
    SimulatedDevice,
    expected_count,
)
from iot.simulator.mqtt_transport import MqttTransport, broker_address_parse
from iot.simulator.state import state_load, state_save
from iot.simulator.transport import DeviceIdentity, Transport

logger = logging.getLogger(__name__)

TRANSPORTS = ("http", "mqtt")


@dataclass(frozen=True)
class DevicePlan:
    index: int
    serial_number: str
    group_id: str | None
    hot: bool
    ota_plan: str


@dataclass
class RegistrationSummary:
    created: int = 0
    existing: int = 0
    token_unknown: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DeviceReport:
    serial_number: str
    device_id: str
    group_id: str | None
    hot: bool
    ota_plan: str
    firmware_version: str
    stats: DeviceStats
    updates: dict[str, str]
    update_reasons: dict[str, str]
    update_in_progress: str | None
    transport_counters: dict[str, int] = field(default_factory=dict)


SUMMED_COUNTERS = (
    "requests",
    "points_sent",
    "points_accepted",
    "points_refused",
    "points_dropped",
    "points_rejected",
    "refused_429",
    "refused_503",
    "backoff_seconds",
    "transport_errors",
    "server_errors",
    "ota_polls",
    "ota_refused",
)


@dataclass
class FleetStats:
    """A snapshot of the fleet's counters (sums over devices; see `DeviceStats` for each)."""

    elapsed: float = 0.0
    transport: str = "http"
    devices: int = 0  # running (registered with a known token)
    token_unknown: list[str] = field(default_factory=list)
    auth_failed: int = 0
    crashed: int = 0
    requests: int = 0
    points_sent: int = 0
    points_accepted: int = 0
    points_refused: int = 0
    points_dropped: int = 0
    points_rejected: int = 0
    refused_429: int = 0
    refused_503: int = 0
    backoff_seconds: float = 0.0
    transport_errors: int = 0
    server_errors: int = 0
    ota_polls: int = 0
    ota_refused: int = 0
    # MQTT: messages the broker acknowledged (counted accepted) that the platform then refused, on devices/{id}/errors
    refused_async: int = 0
    updates_installed: int = 0
    updates_failed: int = 0
    updates_silent: int = 0
    updates_abandoned: int = 0
    updates_in_progress: int = 0
    per_device: list[DeviceReport] = field(default_factory=list)

    @property
    def updates_ended(self) -> int:
        """Updates the devices are done with: installed, failed, silent or abandoned."""
        return self.updates_installed + self.updates_failed + self.updates_silent + self.updates_abandoned

    def summary_line(self) -> str:
        return (
            f"t={self.elapsed:.0f}s devices={self.devices} "
            f"points sent={self.points_sent} accepted={self.points_accepted} refused={self.points_refused} "
            f"(429={self.refused_429} 503={self.refused_503}) dropped={self.points_dropped} "
            f"rejected={self.points_rejected} errors={self.transport_errors + self.server_errors} "
            + (f"refused-async={self.refused_async} " if self.transport == "mqtt" else "")
            + "| "
            f"updates installed={self.updates_installed} failed={self.updates_failed} "
            f"silent={self.updates_silent} abandoned={self.updates_abandoned} "
            f"in-progress={self.updates_in_progress}"
        )

    def as_dict(self, *, per_device: bool = True) -> dict:
        data = asdict(self)
        data["updates_ended"] = self.updates_ended
        if not per_device:
            data.pop("per_device")
        return data


class FleetSimulator:
    """N devices registered on a platform, sending telemetry and taking firmware updates over `transport`."""

    def __init__(
        self,
        *,
        base_url: str,
        operator_token: str,
        devices: int = 10,
        groups: int = 1,
        prefix: str = "SIM",
        device_type: str = "sensor",
        firmware_version: str = "1.0.0",
        interval: float = 5.0,
        jitter: float = 0.2,
        metrics: tuple[str, ...] = DEFAULT_METRICS,
        alert_rate: float = 0.0,
        failure_rate: float = 0.0,
        silence_rate: float = 0.0,
        ota: bool = True,
        ota_poll_interval: float = 2.0,
        ota_idle_poll_interval: float | None = None,
        seed: int = 0,
        state_path: Path | str | None = None,
        transport: str | Callable[[], Transport] = "http",
        mqtt_url: str | None = None,
        max_connections: int = 64,
        timeout: float = 15.0,
        idempotency: bool = True,
        register_concurrency: int = 16,
        register_timeout: float = 120.0,
        start_spread: float | None = None,
        summary_interval: float | None = None,
        on_summary: Callable[[str], None] | None = None,
    ):
        for name, rate in (("alert_rate", alert_rate), ("failure_rate", failure_rate), ("silence_rate", silence_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {rate}")
        if failure_rate + silence_rate > 1.0:
            raise ValueError("failure_rate + silence_rate must not exceed 1")
        if devices < 1 or groups < 1:
            raise ValueError("devices and groups must be at least 1")
        if interval <= 0 or ota_poll_interval <= 0 or (ota_idle_poll_interval or 1) <= 0:
            raise ValueError("interval and ota_poll_interval must be positive")
        if isinstance(transport, str) and transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS} (or a factory), not {transport!r}")
        if transport == "mqtt":
            if not mqtt_url:
                raise ValueError("transport 'mqtt' needs mqtt_url (mqtt://host:port)")
            broker_address_parse(mqtt_url)  # a bad URL stops us here, not in every device
        if not metrics:
            raise ValueError("at least one metric")
        self.base_url = base_url.rstrip("/")
        self.operator_token = operator_token
        self.device_count = devices
        self.groups = groups
        self.prefix = prefix
        self.device_type = device_type
        self.firmware_version = firmware_version
        self.interval = interval
        self.jitter = jitter
        self.metrics = tuple(metrics)
        self.ota = ota
        self.ota_poll_interval = ota_poll_interval
        self.ota_idle_poll_interval = ota_idle_poll_interval
        self.seed = seed
        self.state_path = Path(state_path) if state_path else None
        self.transport = transport
        self.mqtt_url = mqtt_url
        self.max_connections = max_connections
        self.timeout = timeout
        self.idempotency = idempotency
        self.register_concurrency = register_concurrency
        self.register_timeout = register_timeout
        self.start_spread = start_spread
        self.summary_interval = summary_interval
        self.on_summary = on_summary
        self.plan = self._plan(alert_rate=alert_rate, failure_rate=failure_rate, silence_rate=silence_rate)
        self.devices: list[SimulatedDevice] = []
        self.registration: RegistrationSummary | None = None
        self._crashed = 0
        self._transport: Transport | None = None  # the last run's, kept for its counters
        self._elapsed = 0.0
        self._started_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    # ------------------------------------------------------------------- plan

    def _plan(self, *, alert_rate: float, failure_rate: float, silence_rate: float) -> list[DevicePlan]:
        count = self.device_count
        hot_order = list(range(count))
        random.Random(f"{self.seed}:alert").shuffle(hot_order)
        hot = set(hot_order[: expected_count(alert_rate, count)])
        ota_order = list(range(count))
        random.Random(f"{self.seed}:ota").shuffle(ota_order)
        failing_count = expected_count(failure_rate, count)
        failing = set(ota_order[:failing_count])
        silent = set(ota_order[failing_count : failing_count + expected_count(silence_rate, count)])
        return [
            DevicePlan(
                index=index,
                serial_number=f"{self.prefix}-{index}",
                group_id=f"{self.prefix}-group-{index % self.groups}",
                hot=index in hot,
                ota_plan=FAIL if index in failing else SILENT if index in silent else INSTALL,
            )
            for index in range(count)
        ]

    # ----------------------------------------------------------- registration

    def _registration_body(self, plan: DevicePlan) -> dict:
        return {
            "serial_number": plan.serial_number,
            "device_type": self.device_type,
            "firmware_version": self.firmware_version,
            "group_id": plan.group_id,
            "metadata": {"simulated": True, "simulator_prefix": self.prefix},
        }

    def _make_device(self, plan: DevicePlan, identity: DeviceIdentity, firmware_version: str) -> SimulatedDevice:
        return SimulatedDevice(
            identity=identity,
            group_id=plan.group_id,
            firmware_version=firmware_version,
            hot=plan.hot,
            ota_plan=plan.ota_plan,
            seed=self.seed,
            interval=self.interval,
            jitter=self.jitter,
            ota_poll_interval=self.ota_poll_interval,
            ota_idle_poll_interval=self.ota_idle_poll_interval,
            metrics=self.metrics,
            idempotency=self.idempotency,
        )

    async def aregister(self) -> RegistrationSummary:
        """Register every planned device (`POST /devices`); devices whose token is unknown are left out."""
        started = time.monotonic()
        known = state_load(self.state_path)
        semaphore = asyncio.Semaphore(self.register_concurrency)
        deadline = started + self.register_timeout

        async with async_client(
            self.base_url,
            max_connections=self.register_concurrency,
            timeout=self.timeout,
            pool_timeout=self.register_timeout,
            headers={"Authorization": f"Token {self.operator_token}"},
        ) as client:

            async def one(plan: DevicePlan) -> Registration:
                body = self._registration_body(plan)
                # Same body -> same key: a retried or re-run registration replays its 201 (and token) for 24 h.
                digest = hashlib.sha256(repr(sorted(body.items())).encode()).hexdigest()[:16]
                async with semaphore:
                    return await device_register(
                        client, body, idempotency_key=f"simulate-fleet:{plan.serial_number}:{digest}", deadline=deadline
                    )

            registrations = await asyncio.gather(*(one(plan) for plan in self.plan))

        summary = RegistrationSummary()
        devices = []
        for plan, registration in zip(self.plan, registrations, strict=True):
            token = registration.token
            if registration.created:
                summary.created += 1
            else:
                summary.existing += 1
                stored = known.get(plan.serial_number)
                if token is None and stored and stored.get("id") == registration.device_id:
                    token = stored["token"]
            if token is None:
                summary.token_unknown.append(plan.serial_number)
                known.pop(plan.serial_number, None)
                continue
            known[plan.serial_number] = {"id": registration.device_id, "token": token}
            identity = DeviceIdentity(id=registration.device_id, serial_number=plan.serial_number, token=token)
            devices.append(self._make_device(plan, identity, registration.firmware_version))
        if self.state_path is not None:
            state_save(self.state_path, base_url=self.base_url, devices=known)
        self.devices = devices
        summary.seconds = time.monotonic() - started
        self.registration = summary
        return summary

    def register(self) -> RegistrationSummary:
        return run_coroutine(self.aregister())

    def device(self, serial_number: str) -> SimulatedDevice:
        for device in self.devices:
            if device.identity.serial_number == serial_number:
                return device
        raise KeyError(serial_number)

    # ----------------------------------------------------------------- stats

    def stats(self) -> FleetStats:
        stats = FleetStats(
            elapsed=self._elapsed + (time.monotonic() - self._started_at if self._started_at else 0.0),
            transport=self.transport if isinstance(self.transport, str) else "custom",
            devices=len(self.devices),
            token_unknown=list(self.registration.token_unknown) if self.registration else [],
            crashed=self._crashed,
        )
        plans = {plan.serial_number: plan for plan in self.plan}
        for device in self.devices:
            counters = device.stats
            for name in SUMMED_COUNTERS:
                setattr(stats, name, getattr(stats, name) + getattr(counters, name))
            stats.auth_failed += counters.auth_failed
            for outcome in device.updates.values():
                if outcome == INSTALLED:
                    stats.updates_installed += 1
                elif outcome == FAILED:
                    stats.updates_failed += 1
                elif outcome == WENT_SILENT:
                    stats.updates_silent += 1
                elif outcome == ABANDONED:
                    stats.updates_abandoned += 1
            stats.updates_in_progress += device.update is not None
            transport_counters = self._transport.device_counters(device.identity.id) if self._transport else {}
            stats.refused_async += transport_counters.get("refused_async", 0)
            plan = plans[device.identity.serial_number]
            stats.per_device.append(
                DeviceReport(
                    serial_number=device.identity.serial_number,
                    device_id=device.identity.id,
                    group_id=device.group_id,
                    hot=device.hot,
                    ota_plan=plan.ota_plan,
                    firmware_version=device.firmware_version,
                    stats=DeviceStats(**asdict(counters)),
                    updates=dict(device.updates),
                    update_reasons=dict(device.update_reasons),
                    update_in_progress=device.update.update_id if device.update else None,
                    transport_counters=transport_counters,
                )
            )
        stats.backoff_seconds = round(stats.backoff_seconds, 3)
        return stats

    # -------------------------------------------------------------------- run

    def _make_transport(self) -> Transport:
        if callable(self.transport):
            return self.transport()
        http = HttpTransport(self.base_url, max_connections=self.max_connections, timeout=self.timeout)
        if self.transport == "mqtt":
            return MqttTransport(self.mqtt_url, http=http, timeout=self.timeout)
        return http

    async def _loop(self, step, transport: Transport, first_delay: float) -> None:
        await asyncio.sleep(first_delay)
        while True:
            try:
                delay = await step(transport)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A simulator bug, not a platform answer: counted (`crashed`) and logged, the rest go on.
                self._crashed += 1
                logger.exception("simulated device step crashed")
                return
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(self.summary_interval)
            self.on_summary(self.stats().summary_line())

    def request_stop(self) -> None:
        """Make the running (or else the next) `arun` return soon (thread-safe; what Ctrl-C does in the command)."""
        self._stop.set()

    async def arun(
        self,
        *,
        duration: float | None = None,
        until: Callable[[FleetStats], bool] | None = None,
        timeout: float | None = None,
        handle_signals: bool = False,
    ) -> FleetStats:
        """Run until `duration` s passed, `until(stats)` holds (checked every 0.2 s), `timeout` s passed,
        or `request_stop()` (or SIGINT/SIGTERM with `handle_signals`). Registers first if needed."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._on_signal, loop, signum)
        transport = self._transport = self._make_transport()
        tasks: list[asyncio.Task] = []
        try:
            if self.registration is None:
                await self.aregister()
            spread = self.start_spread if self.start_spread is not None else self.interval
            rng = random.Random(f"{self.seed}:start")
            for device in self.devices:
                tasks.append(asyncio.create_task(self._loop(device.telemetry_step, transport, rng.uniform(0, spread))))
                if self.ota:
                    first_poll = rng.uniform(0, self.ota_idle_poll_interval or self.ota_poll_interval)
                    tasks.append(asyncio.create_task(self._loop(device.ota_step, transport, first_poll)))
            if self.summary_interval and self.on_summary:
                tasks.append(asyncio.create_task(self._summaries()))
            self._started_at = time.monotonic()
            limit = min(x for x in (duration, timeout, float("inf")) if x is not None)
            end = self._started_at + limit
            while not self._stop.is_set():
                if until is not None and until(self.stats()):
                    break
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(0.2, remaining))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await transport.aclose()
            if self._started_at is not None:
                self._elapsed += time.monotonic() - self._started_at
                self._started_at = None
            if handle_signals:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
            self._stop.clear()
        return self.stats()

    def _on_signal(self, loop: asyncio.AbstractEventLoop, signum: int) -> None:
        self.request_stop()
        # A second Ctrl-C falls through to Python's default (KeyboardInterrupt).
        loop.remove_signal_handler(signum)

    def run(self, *, duration: float | None = None) -> FleetStats:
        """Run for `duration` seconds (None: until `request_stop()` from another thread)."""
        return run_coroutine(self.arun(duration=duration))

    def run_until(self, predicate: Callable[[FleetStats], bool], *, timeout: float) -> bool:
        """Run until `predicate(stats)` holds (True) or `timeout` seconds passed (False)."""
        result = {}

        def check(stats: FleetStats) -> bool:
            result["met"] = bool(predicate(stats))
            return result["met"]

        run_coroutine(self.arun(until=check, timeout=timeout))
        return result.get("met", False) or bool(predicate(self.stats()))

    # -------------------------------------------------------- background thread

    def start(self) -> None:
        """Run in a background thread (registering first, in the caller's thread, if needed)."""
        if self._thread is not None:
            raise RuntimeError("already running")
        if self.registration is None:
            self.register()
        self._stop.clear()

        def target():
            try:
                run_coroutine(self.arun())
            except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
                self._thread_error = exc

        self._thread = threading.Thread(target=target, name="fleet-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> FleetStats:
        """Stop the background run; re-raises what made it fail."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self.request_stop()
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"the simulator did not stop within {timeout}s")
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise error
        return self.stats()

    @contextmanager
    def running(self) -> Iterator["FleetSimulator"]:
        """`with fleet.running(): ...` runs the fleet in a thread for the block."""
        self.start()
        try:
            yield self
        except BaseException:
            with suppress(Exception):
                self.stop()
            raise
        self.stop()


def run_coroutine(coroutine):
    """Run a coroutine on a fresh event loop (uvloop when installed, as the web server uses)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
