"""The simulated device's state machine, driven step by step against a scripted transport (no network)."""

import asyncio
import base64
import hashlib

import httpx
import pytest

from iot.simulator.client import HttpTransport, retry_after_seconds
from iot.simulator.device import (
    ABANDONED,
    FAIL,
    FAILED,
    INSTALL,
    INSTALL_FAILURE_REASON,
    INSTALLED,
    SILENT,
    WENT_SILENT,
    SimulatedDevice,
)
from iot.simulator.fleet import FleetSimulator
from iot.simulator.transport import DeviceIdentity, Download, Reply, Transport, TransportError, checksum_expected_sha256

ARTIFACT = b"firmware image " * 1000
DIGEST = hashlib.sha256(ARTIFACT).hexdigest()
IDENTITY = DeviceIdentity(id="7d9f5a52-2a3c-4c1e-9f7e-1a2b3c4d5e6f", serial_number="SIM-0", token="secret")


class FakeTransport(Transport):
    """Answers from scripts (lists of replies or exceptions, consumed in order; the last one repeats)."""

    def __init__(self, *, sends=None, polls=None, reports=None, artifact=ARTIFACT):
        self.sends = list(sends or [Reply(202)])
        self.polls = list(polls or [Reply(204)])
        self.reports_script = list(reports or [Reply(200)])
        self.artifact = artifact
        self.sent: list[tuple[str | None, list[dict]]] = []
        self.reports: list[tuple[str, dict]] = []
        self.downloads: list[str] = []

    @staticmethod
    def _next(script):
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def send_points(self, device, points, *, idempotency_key=None):
        self.sent.append((idempotency_key, list(points)))
        return self._next(self.sends)

    async def poll_update(self, device):
        return self._next(self.polls)

    async def report(self, device, update_id, report):
        self.reports.append((update_id, report))
        return self._next(self.reports_script)

    async def download(self, device, url):
        self.downloads.append(url)
        return Download(status=200, sha256=hashlib.sha256(self.artifact).hexdigest(), size=len(self.artifact))

    @property
    def statuses(self) -> list[str]:
        return [report["status"] for _, report in self.reports]


def offer(update_id="u1", *, checksum=f"sha256-{DIGEST}", install_allowed=True, status="pending", to_version="2.0.0"):
    return Reply(
        200,
        {
            "update_id": update_id,
            "to_version": to_version,
            "artifact_url": f"/firmware/artifacts/{to_version}",
            "checksum": checksum,
            "size_bytes": len(ARTIFACT),
            "status": status,
            "install_allowed": install_allowed,
        },
    )


def device(**kwargs) -> SimulatedDevice:
    options = {"identity": IDENTITY, "group_id": "g", "firmware_version": "1.0.0", "seed": 1, **kwargs}
    return SimulatedDevice(**options)


def step(dev, transport, kind="ota"):
    return asyncio.run(getattr(dev, f"{kind}_step")(transport))


# ------------------------------------------------------------------ firmware


def test_update_waits_for_install_allowed_then_installs_and_switches_version():
    transport = FakeTransport(polls=[offer(install_allowed=False)])
    dev = device()
    step(dev, transport)
    assert transport.statuses == ["downloading", "downloaded"]
    assert transport.reports[0] == ("u1", {"status": "downloading", "progress": 0})
    assert transport.downloads == ["/firmware/artifacts/2.0.0"]
    step(dev, transport)  # still not allowed: nothing more
    assert transport.statuses == ["downloading", "downloaded"] and dev.firmware_version == "1.0.0"

    transport.polls = [offer(install_allowed=True)]
    step(dev, transport)
    assert transport.statuses == ["downloading", "downloaded", "installing", "installed"]
    assert transport.reports[-1] == ("u1", {"status": "installed", "version": "2.0.0"})
    assert dev.firmware_version == "2.0.0" and dev.updates == {"u1": INSTALLED} and dev.update is None
    step(dev, transport)  # the platform still offering the finished update changes nothing
    assert len(transport.reports) == 4 and transport.downloads == ["/firmware/artifacts/2.0.0"]


@pytest.mark.parametrize(
    "checksum",
    [
        f"sha256-{DIGEST}",
        f"sha256:{DIGEST}",
        DIGEST,
        DIGEST.upper(),
        "sha256-" + base64.b64encode(bytes.fromhex(DIGEST)).decode(),
    ],
)
def test_checksum_forms_are_accepted(checksum):
    transport = FakeTransport(polls=[offer(checksum=checksum)])
    dev = device()
    step(dev, transport)
    step(dev, transport)
    assert dev.updates == {"u1": INSTALLED}, dev.update_reasons


def test_checksum_mismatch_reports_failed_with_the_reason_and_keeps_the_old_version():
    transport = FakeTransport(polls=[offer()], artifact=b"tampered image")
    dev = device()
    step(dev, transport)
    assert transport.statuses == ["downloading", "failed"]
    reason = transport.reports[-1][1]["reason"]
    assert reason.startswith(f"checksum mismatch: expected sha256 {DIGEST}, got ")
    assert hashlib.sha256(b"tampered image").hexdigest() in reason
    assert dev.updates == {"u1": FAILED} and dev.firmware_version == "1.0.0"
    step(dev, transport)
    assert transport.statuses == ["downloading", "failed"]


@pytest.mark.parametrize("checksum", ["md5:abc", "sha256-tooshort", ""])
def test_unusable_checksum_fails_the_update(checksum):
    transport = FakeTransport(polls=[offer(checksum=checksum)])
    dev = device()
    step(dev, transport)
    assert transport.statuses == ["downloading", "failed"]
    assert transport.reports[-1][1]["reason"].startswith("unsupported checksum")


def test_failing_device_reports_simulated_install_failure_after_installing():
    transport = FakeTransport(polls=[offer()])
    dev = device(ota_plan=FAIL)
    step(dev, transport)
    step(dev, transport)
    assert transport.statuses == ["downloading", "downloaded", "installing", "failed"]
    assert transport.reports[-1][1] == {"status": "failed", "reason": INSTALL_FAILURE_REASON}
    assert dev.updates == {"u1": FAILED} and dev.firmware_version == "1.0.0"


def test_silent_device_reports_downloading_then_nothing_about_that_update():
    transport = FakeTransport(polls=[offer()])
    dev = device(ota_plan=SILENT)
    for _ in range(4):
        step(dev, transport)
    assert transport.statuses == ["downloading"] and dev.updates == {"u1": WENT_SILENT}
    assert transport.downloads == []
    # A later update is still taken up (and silenced again: the plan is the device's).
    transport.polls = [offer("u2", to_version="3.0.0")]
    step(dev, transport)
    assert transport.reports[-1] == ("u2", {"status": "downloading", "progress": 0})


def test_report_refused_for_now_is_retried_refused_for_good_abandons():
    transport = FakeTransport(polls=[offer()], reports=[Reply(503, retry_after=1.0), Reply(200)])
    dev = device()
    step(dev, transport)  # downloading refused: nothing advanced
    assert transport.statuses == ["downloading"] and dev.update.phase == "report_downloading"
    step(dev, transport)
    step(dev, transport)
    assert dev.updates == {"u1": INSTALLED}

    transport = FakeTransport(polls=[offer("u9")], reports=[Reply(200), Reply(409, {"detail": "cancelled"})])
    dev = device()
    step(dev, transport)
    assert transport.statuses == ["downloading", "downloaded"]
    assert dev.updates == {"u9": ABANDONED} and "HTTP 409" in dev.update_reasons["u9"]


def test_update_withdrawn_while_awaiting_install_is_abandoned():
    transport = FakeTransport(polls=[offer(install_allowed=False)])
    dev = device()
    step(dev, transport)
    transport.polls = [Reply(204)]
    step(dev, transport)
    assert dev.updates == {"u1": ABANDONED} and dev.update is None


def test_offer_further_along_resumes_where_the_platform_says():
    transport = FakeTransport(polls=[offer(status="installing")])
    dev = device()
    step(dev, transport)
    assert transport.statuses == ["installed"] and transport.downloads == []
    silent = device(ota_plan=SILENT)
    transport = FakeTransport(polls=[offer(status="downloaded")])
    step(silent, transport)
    assert transport.reports == [] and silent.updates == {"u1": WENT_SILENT}


def test_download_errors_retry_then_fail():
    class Flaky(FakeTransport):
        async def download(self, device, url):
            self.downloads.append(url)
            raise TransportError("ReadTimeout")

    transport = Flaky(polls=[offer()])
    dev = device()
    for _ in range(3):
        step(dev, transport)
    assert transport.statuses == ["downloading", "failed"] and len(transport.downloads) == 3
    assert transport.reports[-1][1]["reason"] == "download failed: ReadTimeout"


def test_poll_answers_429_with_retry_after_and_401_stops():
    dev = device(ota_poll_interval=2.0)
    assert step(dev, FakeTransport(polls=[Reply(429, retry_after=30.0)])) >= 30.0
    assert dev.stats.ota_refused == 1
    assert step(dev, FakeTransport(polls=[Reply(401)])) is None
    assert dev.stats.auth_failed and dev.stopped


# ----------------------------------------------------------------- telemetry


def test_telemetry_sends_one_batch_of_every_metric_with_jittered_interval():
    transport = FakeTransport()
    dev = device(interval=10.0, jitter=0.2)
    delays = [step(dev, transport, "telemetry") for _ in range(20)]
    assert all(8.0 <= delay <= 12.0 for delay in delays) and len(set(delays)) > 1
    key, points = transport.sent[0]
    assert [point["metric"] for point in points] == ["temperature", "humidity", "battery"]
    assert points[0]["timestamp"].endswith("Z") and key
    assert dev.stats.points_accepted == dev.stats.points_sent == 60


def test_429_and_503_back_off_for_retry_after_and_resend_the_points():
    transport = FakeTransport(sends=[Reply(429, retry_after=7.0), Reply(503, retry_after=3.0), Reply(202)])
    dev = device(interval=1.0)
    first = step(dev, transport, "telemetry")
    assert 7.0 <= first <= 7.0 * 1.2
    second = step(dev, transport, "telemetry")
    assert 3.0 <= second <= 3.6
    step(dev, transport, "telemetry")
    (key1, batch1), (key2, batch2), (key3, batch3) = transport.sent
    # The refused points are kept and sent again with the new samples (a fresh key: nothing was stored).
    assert batch2[:3] == batch1 and batch3[:6] == batch2 and len(batch3) == 9
    assert len({key1, key2, key3}) == 3
    stats = dev.stats
    assert (stats.refused_429, stats.refused_503, stats.points_refused, stats.points_accepted) == (1, 1, 9, 9)
    assert stats.backoff_seconds == pytest.approx(first + second)


def test_429_without_retry_after_drops_the_batch():
    transport = FakeTransport(sends=[Reply(429, {"code": "batch_exceeds_limit"}), Reply(202)])
    dev = device()
    step(dev, transport, "telemetry")
    step(dev, transport, "telemetry")
    assert dev.stats.points_dropped == 3 and len(transport.sent[1][1]) == 3


def test_buffer_is_capped_oldest_points_dropped():
    transport = FakeTransport(sends=[Reply(503, retry_after=1.0)])
    dev = device(max_buffered_points=7)
    for _ in range(5):
        step(dev, transport, "telemetry")
    assert all(len(points) <= 7 for _, points in transport.sent)
    assert dev.stats.points_dropped == 5 * 3 - 7


def test_lost_request_is_resent_unchanged_with_the_same_key():
    transport = FakeTransport(sends=[TransportError("ReadTimeout"), Reply(500), Reply(202)])
    dev = device()
    for _ in range(3):
        step(dev, transport, "telemetry")
    keys = {key for key, _ in transport.sent}
    assert len(keys) == 1 and transport.sent[0][1] == transport.sent[1][1] == transport.sent[2][1]
    step(dev, transport, "telemetry")
    # The samples taken meanwhile follow in the next request.
    assert len(transport.sent[3][1]) == 9 and transport.sent[3][0] not in keys
    assert dev.stats.transport_errors == 1 and dev.stats.server_errors == 1


def test_rejected_telemetry_is_dropped_and_401_stops_the_device():
    transport = FakeTransport(sends=[Reply(422, {"detail": "unknown device"}), Reply(401)])
    dev = device()
    step(dev, transport, "telemetry")
    assert dev.stats.points_rejected == 3
    assert step(dev, transport, "telemetry") is None and dev.stopped
    assert step(dev, transport, "telemetry") is None and len(transport.sent) == 2


def test_hot_devices_climb_normal_ones_stay_in_range():
    hot, normal = device(hot=True), device()
    hot_values = [hot.sensor.sample("temperature") for _ in range(100)]
    normal_values = [normal.sensor.sample("temperature") for _ in range(100)]
    assert max(hot_values[60:]) > 65 and min(hot_values[60:]) > 60
    assert all(18.0 <= value <= 28.0 for value in normal_values)


# ---------------------------------------------------------------- the plan


def plan_of(seed, **kwargs):
    fleet = FleetSimulator(base_url="http://127.0.0.1:1", operator_token="t", seed=seed, **kwargs)
    return {plan.serial_number: (plan.ota_plan, plan.hot, plan.group_id) for plan in fleet.plan}


def test_plan_is_deterministic_for_a_seed_with_exact_counts():
    options = {"devices": 20, "groups": 4, "failure_rate": 0.2, "silence_rate": 0.1, "alert_rate": 0.25}
    plan = plan_of(3, **options)
    assert plan == plan_of(3, **options)
    assert plan != plan_of(4, **options)
    outcomes = [ota for ota, _, _ in plan.values()]
    assert (outcomes.count(FAIL), outcomes.count(SILENT), outcomes.count(INSTALL)) == (4, 2, 14)
    assert sum(hot for _, hot, _ in plan.values()) == 5
    assert {group for _, _, group in plan.values()} == {f"SIM-group-{k}" for k in range(4)}
    assert plan["SIM-5"][2] == "SIM-group-1"


def test_seeded_device_walks_and_jitter_repeat():
    first, second = device(seed=9), device(seed=9)
    assert [first.sample()[0]["value"] for _ in range(5)] == [second.sample()[0]["value"] for _ in range(5)]
    assert [first.jittered(2.0) for _ in range(5)] == [second.jittered(2.0) for _ in range(5)]


@pytest.mark.parametrize(
    "options",
    [{"failure_rate": 0.7, "silence_rate": 0.4}, {"alert_rate": 1.5}, {"devices": 0}, {"transport": "carrier-pigeon"}],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        FleetSimulator(base_url="http://x", operator_token="t", **options)


# ------------------------------------------------------------------ checksums, HTTP details


def test_checksum_parsing():
    assert checksum_expected_sha256(f"SHA256:{DIGEST.upper()}") == DIGEST
    assert checksum_expected_sha256("sha512-" + "a" * 128) is None
    assert checksum_expected_sha256("sha256-" + base64.b64encode(b"short").decode()) is None


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_http_transport_sends_device_auth_to_the_platform_only():
    seen = []

    def handler(request: httpx.Request):
        seen.append((str(request.url), request.headers.get("Authorization")))
        return httpx.Response(200, content=ARTIFACT)

    async def run():
        transport = HttpTransport("http://platform.test:8000")
        transport.client = httpx.AsyncClient(base_url=transport.base_url, transport=httpx.MockTransport(handler))
        local = await transport.download(IDENTITY, "/firmware/artifacts/2.0.0")
        remote = await transport.download(IDENTITY, "https://cdn.example/fw.bin")
        await transport.aclose()
        return local, remote

    local, remote = asyncio.run(run())
    assert local.sha256 == DIGEST and local.size == len(ARTIFACT) and remote.sha256 == DIGEST
    assert seen == [
        ("http://platform.test:8000/firmware/artifacts/2.0.0", "Device secret"),
        ("https://cdn.example/fw.bin", None),
    ]


def test_http_transport_bodies_and_refusals():
    requests = []

    def handler(request: httpx.Request):
        requests.append(request)
        if request.url.path == "/telemetry/batch":
            return httpx.Response(429, json={"code": "rate_limited"}, headers={"Retry-After": "12"})
        if request.url.path == "/firmware/device/update":
            return httpx.Response(204)
        return httpx.Response(202, json={"status": "accepted"})

    async def run():
        transport = HttpTransport("http://platform.test")
        transport.client = httpx.AsyncClient(base_url=transport.base_url, transport=httpx.MockTransport(handler))
        point = {"timestamp": "2024-01-01T00:00:00Z", "metric": "temperature", "value": 1.5}
        single = await transport.send_points(IDENTITY, [point], idempotency_key="k1")
        batch = await transport.send_points(IDENTITY, [point, point])
        poll = await transport.poll_update(IDENTITY)
        report = await transport.report(IDENTITY, "u1", {"status": "downloading", "progress": 0})
        await transport.aclose()
        return single, batch, poll, report

    single, batch, poll, report = asyncio.run(run())
    assert single.status == 202 and batch.status == 429 and batch.retry_after == 12.0 and poll.status == 204
    assert report.ok
    assert [request.url.path for request in requests] == [
        "/telemetry/point",
        "/telemetry/batch",
        "/firmware/device/update",
        "/firmware/updates/u1/report",
    ]
    assert requests[0].headers["Idempotency-Key"] == "k1" and "Idempotency-Key" not in requests[1].headers
    assert requests[0].read() == (
        b'{"device_id":"7d9f5a52-2a3c-4c1e-9f7e-1a2b3c4d5e6f","timestamp":"2024-01-01T00:00:00Z",'
        b'"metric":"temperature","value":1.5}'
    )
    assert all(request.headers["Authorization"] == "Device secret" for request in requests)


def test_report_answered_with_an_ended_update_abandons_it():
    ended = Reply(200, {"status": "rolled_back", "error": "cancelled by an operator"})
    transport = FakeTransport(polls=[offer()], reports=[Reply(200, {"status": "downloading"}), ended])
    dev = device()
    step(dev, transport)
    assert transport.statuses == ["downloading", "downloaded"]
    assert dev.updates == {"u1": ABANDONED} and "rolled_back cancelled by an operator" in dev.update_reasons["u1"]


def test_install_outside_the_maintenance_window_waits_for_install_allowed_again():
    outside = Reply(409, {"code": "outside_maintenance_window", "detail": "not now"})
    transport = FakeTransport(polls=[offer()], reports=[Reply(200), Reply(200), outside, Reply(200)])
    dev = device()
    step(dev, transport)  # downloading, downloaded
    step(dev, transport)  # installing refused: back to waiting
    assert transport.statuses == ["downloading", "downloaded", "installing"] and dev.update.phase == "await_install"
    transport.polls = [offer(install_allowed=False)]
    step(dev, transport)
    assert len(transport.reports) == 3
    transport.polls = [offer()]
    step(dev, transport)
    assert transport.statuses[-2:] == ["installing", "installed"] and dev.updates == {"u1": INSTALLED}


def test_polls_are_slower_when_idle_if_asked():
    dev = device(ota_poll_interval=2.0, ota_idle_poll_interval=30.0, jitter=0.1)
    assert 27.0 <= step(dev, FakeTransport(polls=[Reply(204)])) <= 33.0
    assert 1.8 <= step(dev, FakeTransport(polls=[offer(install_allowed=False)])) <= 2.2
