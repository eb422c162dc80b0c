"""`manage.py run_demo`: play a demo fleet against the running platform (what `make demo` adds to `make run`).

It talks to the platform over HTTP only, as a user's own scripts would (the one exception: the
operator token it uses is made here, as `create_api_token` makes one). Idempotent, so the
supervisor may restart it: devices keep their serial numbers and tokens (state file under var/),
rules and the release are created once, and a rollout is started only if none ran yet.

1. waits for `/health/ready`;
2. alert rules on every demo group: temperature above 30 C (warning) and above 45 C (critical);
3. a firmware release `2.0.0` with a generated 1 MB artifact (its SHA-256 as the checksum);
4. `--devices` simulated devices in `--groups` groups (`iot.simulator.FleetSimulator`): telemetry
   every few seconds, a tenth of them running hot (they cross the rules), OTA polling, and a
   tenth failing their installs;
5. after `--rollout-after` seconds, a staged rollout of `2.0.0` to every demo device (5% -> 25% ->
   100%), so the dashboard shows stages advancing, updates failing and being rolled back;
6. then keeps the fleet running until stopped.
"""

import hashlib
import threading
import time

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token

from iot.simulator.fleet import FleetSimulator

RELEASE = "2.0.0"
ARTIFACT_BYTES = 1024 * 1024


class Command(BaseCommand):
    help = "Play a demo fleet (telemetry, alerts, a staged firmware rollout) against the running platform."
    requires_system_checks: list = []

    def add_arguments(self, parser):
        parser.add_argument("--base-url", default="http://127.0.0.1:8000")
        parser.add_argument("--devices", type=int, default=300)
        parser.add_argument("--groups", type=int, default=5)
        parser.add_argument("--interval", type=float, default=5.0, help="seconds between a device's points")
        parser.add_argument("--rollout-after", type=float, default=30.0)
        parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
        parser.add_argument("--state", default=None, help="the fleet's token file (default var/demo/fleet.json)")

    def handle(self, *args, **options):
        base_url = options["base_url"].rstrip("/")
        user, _ = get_user_model().objects.get_or_create(username="demo-operator")
        token = Token.objects.get_or_create(user=user)[0].key
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Token {token}"}, timeout=30) as api:
            self._wait_ready(api)
            groups = [f"DEMO-group-{n}" for n in range(options["groups"])]
            self._rules(api, groups)
            self._release(api)
            fleet = FleetSimulator(
                base_url=base_url,
                operator_token=token,
                devices=options["devices"],
                groups=options["groups"],
                prefix="DEMO",
                interval=options["interval"],
                alert_rate=0.1,
                failure_rate=0.1,
                ota_poll_interval=2.0,
                ota_idle_poll_interval=15.0,
                seed=42,
                state_path=options["state"] or settings.BASE_DIR / "var" / "demo" / "fleet.json",
                summary_interval=30.0,
                on_summary=lambda line: self.stdout.write(f"demo fleet: {line}"),
            )
            registered = fleet.register()
            self.stdout.write(f"demo: {registered.created + registered.existing} devices in {len(groups)} groups")
            timer = threading.Timer(options["rollout_after"], self._rollout, args=(api,))
            timer.daemon = True
            timer.start()
            try:
                fleet.run(duration=options["duration"])
            finally:
                timer.cancel()

    def _wait_ready(self, api: httpx.Client, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if api.get("/health/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise CommandError(f"the platform at {api.base_url} was not ready within {timeout:g} s")

    def _rules(self, api: httpx.Client, groups: list[str]) -> None:
        existing = {(rule["group_id"], rule["threshold"]) for rule in _all(api, "/alerts/rules")}
        for group in groups:
            for threshold, severity in ((30.0, "warning"), (45.0, "critical")):
                if (group, threshold) in existing:
                    continue
                body = {
                    "group_id": group,
                    "metric": "temperature",
                    "operator": "gt",
                    "threshold": threshold,
                    "severity": severity,
                }
                api.post("/alerts/rules", json=body).raise_for_status()

    def _release(self, api: httpx.Client) -> None:
        if api.get(f"/firmware/versions/{RELEASE}").status_code == 200:
            return
        artifact = hashlib.sha256(b"demo firmware").digest() * (ARTIFACT_BYTES // 32)
        body = {
            "version": RELEASE,
            "size_bytes": len(artifact),
            "checksum": f"sha256:{hashlib.sha256(artifact).hexdigest()}",
            "release_notes": "Demo release",
            "min_compatible_version": "1.0.0",
        }
        api.post("/firmware/register", json=body).raise_for_status()
        files = {"file": ("firmware-2.0.0.bin", artifact, "application/octet-stream")}
        api.put(f"/firmware/versions/{RELEASE}/artifact", files=files).raise_for_status()

    def _rollout(self, api: httpx.Client) -> None:
        try:
            if any(rollout["to_version"] == RELEASE for rollout in _all(api, "/firmware/rollouts")):
                self.stdout.write(f"demo: a rollout of {RELEASE} was started before")
                return
            body = {
                "to_version": RELEASE,
                "from_version": "1.0.0",
                "stages": [5, 25, 100],
                "success_threshold": 0.8,
                "error_threshold": 0.3,
            }
            response = api.post("/firmware/rollouts", json=body)
            response.raise_for_status()
            self.stdout.write(f"demo: rollout {response.json()['id']} of {RELEASE} started (5% -> 25% -> 100%)")
        except httpx.HTTPError as exc:
            self.stderr.write(f"demo: could not start the rollout: {exc}")


def _all(api: httpx.Client, path: str) -> list[dict]:
    """Every item of a paged list (`{"results": [...], "next": url}`), or a plain list."""
    items, url = [], path
    while url:
        response = api.get(url)
        response.raise_for_status()
        page = response.json()
        if isinstance(page, list):
            return page
        items += page["results"]
        url = page.get("next")
    return items
