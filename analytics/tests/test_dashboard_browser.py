"""The fleet dashboard and a device's page in a real browser, against the live platform.

Chromium (Debian's package, headless) driven by Playwright: a staff user signs in through the admin's
login form, the dashboard shows the devices this test registered and, without a reload, the points
it sent; the device's page charts one dot per bucket and switches range in place. Screenshots go to
TEST_ARTIFACTS_DIR (default var/test-artifacts/). Skipped where Chromium or Playwright is missing.
"""

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connections

from devices.models import Device
from iot.testing.live import register_device

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (requirements-dev.txt)")

PASSWORD = "fleet-manager-" + uuid.uuid4().hex
POINTS = 25  # one every 2 minutes: 25 one-minute buckets in the 1 h view, the oldest 48 minutes back


@pytest.fixture(scope="module")
def artifacts() -> Path:
    directory = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO_ROOT / "var" / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def fleet_manager(django_db_setup, django_db_blocker) -> str:
    """A staff user who may view devices (nothing else), committed so the live servers see it."""
    with django_db_blocker.unblock():
        user = get_user_model().objects.create_user(
            username=f"fleet-{uuid.uuid4().hex[:8]}", password=PASSWORD, is_staff=True
        )
        user.user_permissions.add(Permission.objects.get(codename="view_device"))
    yield user.username
    with django_db_blocker.unblock():
        user.delete()


@pytest.fixture(scope="module")
def browser():
    # Playwright's sync API keeps an event loop on this thread, so Django refuses ORM calls here
    # ("async context"). They are plain blocking calls between browser steps, never concurrent with
    # the loop: allowed for this module's test. Inside that context Django hands out connections of
    # its own (asgiref locals follow the context), closed here so the test database can be dropped.
    with pytest.MonkeyPatch.context() as patch, sync_api.sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield launched
        launched.close()
        connections.close_all()


def sign_in(browser, platform, username: str, *, color_scheme: str = "light"):
    page = browser.new_page(viewport={"width": 1440, "height": 900}, color_scheme=color_scheme)
    page.set_default_timeout(30_000)
    page.goto(f"{platform.base_url}/admin/")
    assert "/admin/login/" in page.url  # the admin's own login guards the dashboard
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#fleet-dashboard")
    return page


def figure(page, selector: str) -> int:
    return int(page.locator(selector).first.get_attribute("data-value"))


def status_counts() -> dict[str, int]:
    counts = dict.fromkeys(("registered", "active", "inactive", "maintenance", "decommissioned"), 0)
    for status in Device.objects.values_list("status", flat=True):
        counts[status] += 1
    return counts


def test_dashboard_and_device_page_in_a_browser(platform, api, anonymous, browser, fleet_manager, artifacts):
    before = status_counts()
    page = sign_in(browser, platform, fleet_manager)
    registered = [register_device(api, "DASH-UI") for _ in range(6)]
    sender = registered[0]
    rule = api.post(
        "/alerts/rules",
        json={
            "device_id": sender["id"],
            "metric": "temperature",
            "operator": "gt",
            "threshold": 40.0,
            "severity": "critical",
        },
    )
    assert rule.status_code == 201, rule.text
    now = datetime.now(UTC)
    stamps = [now - timedelta(minutes=2 * (POINTS - 1 - i), seconds=1) for i in range(POINTS)]
    batch = {
        "device_id": sender["id"],
        "points": [
            *({"timestamp": ts.isoformat(), "metric": "temperature", "value": 20.0 + i} for i, ts in enumerate(stamps)),
            *({"timestamp": ts.isoformat(), "metric": "humidity", "value": 50.0} for ts in stamps[-5:]),
        ],
    }
    sent = anonymous.post("/telemetry/batch", json=batch, headers={"Authorization": f"Device {sender['device_token']}"})
    assert sent.status_code == 202, sent.text

    # The open page refreshes itself: the points show in the ingestion chart without a reload.
    page.wait_for_function(
        """(n) => {
            const bars = [...document.querySelectorAll('svg[data-chart="ingestion"] rect.fleet-bar')];
            return bars.length === 60 && bars.slice(-2).reduce((sum, bar) => sum + Number(bar.dataset.value), 0) >= n;
        }""",
        arg=POINTS + 5,
    )
    assert "Live · updated" in page.locator("[data-live-text]").inner_text()
    bars = [
        int(v)
        for v in page.locator('svg[data-chart="ingestion"] rect.fleet-bar').evaluate_all(
            "bars => bars.map(bar => bar.dataset.value)"
        )
    ]
    assert figure(page, '[data-figure="points-last-hour"]') == sum(bars)

    # Devices by status: this test's six on top of what was there (other tests' devices share the database).
    page.reload()
    page.wait_for_selector("#fleet-dashboard")
    assert figure(page, '[data-kpi="devices"] .fleet-kpi-value') == sum(before.values()) + 6
    assert figure(page, 'tr[data-status="registered"] td[data-value]') == before["registered"] + 5
    assert figure(page, 'tr[data-status="active"] td[data-value]') == status_counts()["active"]
    assert Device.objects.get(pk=sender["id"]).status == "active"
    segments = page.locator('svg[data-chart="devices-by-status"] rect.fleet-segment')
    assert sum(int(v) for v in segments.evaluate_all("s => s.map(r => r.dataset.value)")) == sum(before.values()) + 6
    assert figure(page, '[data-severity="critical"]') >= 1
    assert page.locator(f'[data-table="alerts-newest"] a[href*="{sender["id"]}"]').count() >= 1
    page.screenshot(path=str(artifacts / "fleet-dashboard.png"), full_page=True)

    # The device's page: one dot per one-minute bucket of the last hour, its alert, a range switch in place.
    page.goto(f"{platform.base_url}/admin/devices/device/{sender['id']}/change/")
    chart = page.locator('svg[data-chart="metric:temperature"]')
    chart.wait_for()
    assert chart.locator("circle.fleet-point").count() == POINTS
    assert page.locator('svg[data-chart="metric:humidity"] circle.fleet-point').count() == 5
    assert page.locator('[data-table="device-alerts"] tr[data-status="open"]').count() == 1
    page.screenshot(path=str(artifacts / "device-1h.png"), full_page=True)
    page.click('[data-live-range="24h"]')
    page.wait_for_selector('#device-panels [data-range="24h"]')
    assert page.url.endswith("?range=24h")
    quarter_hours = {int(ts.timestamp()) // 900 for ts in stamps}
    assert page.locator('svg[data-chart="metric:temperature"] circle.fleet-point').count() == len(quarter_hours)
    page.screenshot(path=str(artifacts / "device-24h.png"), full_page=True)
    page.close()

    dark = sign_in(browser, platform, fleet_manager, color_scheme="dark")
    background = dark.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(18, 18, 18)"  # the admin's dark theme, which the charts' colours follow
    dark.screenshot(path=str(artifacts / "fleet-dashboard-dark.png"), full_page=True)
    dark.close()
