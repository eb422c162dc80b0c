"""`manage.py simulate_fleet`: N simulated devices against a running platform, over HTTP or MQTT.

    manage.py simulate_fleet --token KEY --devices 200 --groups 10 --alert-rate 0.1 \
        --failure-rate 0.05 --silence-rate 0.02 --duration 300 --json var/fleet.json

The devices register (`POST /devices` with the operator token), send telemetry and take
firmware updates until `--duration` passes or Ctrl-C; a one-line summary is printed every
`--summary-interval` seconds and at the end. The library behind it is `iot.simulator`.

`--transport mqtt` connects each device to the broker (`--mqtt-url`, default `MQTT_URL`) with its id
and token and publishes telemetry and reports there; registration, artifacts and the look-up of an
update pushed before a device connected stay on HTTP (`--base-url`).
"""

import json
import logging
from io import StringIO
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from iot.simulator.device import DEFAULT_METRICS
from iot.simulator.fleet import TRANSPORTS, FleetSimulator, run_coroutine
from iot.simulator.state import state_load


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


class Command(BaseCommand):
    help = "Simulate a device fleet (registration, telemetry, firmware updates) against a running platform."
    # A client of the platform: its checks (URLconf, models) are the server's business.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="The platform (default %(default)s).")
        credentials = parser.add_mutually_exclusive_group(required=True)
        credentials.add_argument("--token", help="An operator API token (manage.py create_api_token).")
        credentials.add_argument(
            "--operator",
            metavar="USERNAME",
            help="Create (if needed) this user and its token in this settings' database, as create_api_token does.",
        )
        parser.add_argument("--devices", type=int, default=10, help="Number of devices (default %(default)s).")
        parser.add_argument("--groups", type=int, default=1, help="Groups (group_id <prefix>-group-<k>).")
        parser.add_argument("--prefix", default="SIM", help="Serials are <prefix>-<index> (default %(default)s).")
        parser.add_argument("--device-type", default="sensor")
        parser.add_argument("--firmware-version", default="1.0.0", help="Firmware of new devices.")
        parser.add_argument(
            "--metrics", default=",".join(DEFAULT_METRICS), help="Comma-separated metrics (default %(default)s)."
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=5.0,
            help="Seconds between a device's telemetry requests (one batch of all metrics; default %(default)s: "
            "3 metrics every 5 s is 36 points a minute, under the default 100 per device per minute).",
        )
        parser.add_argument("--jitter", type=float, default=0.2, help="Fraction of jitter on every wait (0.2).")
        parser.add_argument("--alert-rate", type=_rate, default=0.0, help="Fraction of devices running hot.")
        parser.add_argument("--failure-rate", type=_rate, default=0.0, help="Fraction of devices failing updates.")
        parser.add_argument(
            "--silence-rate", type=_rate, default=0.0, help="Fraction of devices going silent after 'downloading'."
        )
        parser.add_argument(
            "--ota-poll-interval", type=float, default=2.0, help="Seconds between update polls (default %(default)s)."
        )
        parser.add_argument(
            "--ota-idle-poll-interval",
            type=float,
            help="Seconds between polls while a device has no update in hand (default: --ota-poll-interval). "
            "500 devices polling every 2 s are 250 requests/s, more than their telemetry.",
        )
        parser.add_argument("--no-ota", action="store_true", help="Do not poll for firmware updates.")
        parser.add_argument("--seed", type=int, default=0, help="Makes the plan and the random walks repeatable.")
        parser.add_argument("--duration", type=float, help="Seconds to run (default: until Ctrl-C).")
        parser.add_argument(
            "--state",
            type=Path,
            help="JSON file keeping the device tokens between runs (default var/simulate_fleet/<prefix>.json).",
        )
        parser.add_argument("--json", type=Path, dest="json_path", help="Write the final stats here (JSON).")
        parser.add_argument("--transport", choices=TRANSPORTS, default="http")
        parser.add_argument(
            "--mqtt-url",
            default=settings.MQTT_URL or None,
            help="The broker for --transport mqtt: mqtt://host:port or mqtts://host:port (default: the MQTT_URL "
            "setting, %(default)s).",
        )
        parser.add_argument("--max-connections", type=int, default=64, help="HTTP connection pool size.")
        parser.add_argument("--summary-interval", type=float, default=5.0, help="Seconds between summary lines.")
        parser.add_argument("--no-idempotency", action="store_true", help="Send telemetry without Idempotency-Key.")

    def handle(self, *args, **options):
        # httpx logs every request at INFO: thousands of lines a minute for a fleet.
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if options["transport"] == "mqtt" and not options["mqtt_url"]:
            raise CommandError(
                "--transport mqtt needs --mqtt-url: MQTT_URL is not set in these settings (the broker `make run` "
                "starts prints its address)"
            )
        token = options["token"] or self._operator_token(options["operator"])
        default_state = Path(settings.BASE_DIR) / "var" / "simulate_fleet" / f"{options['prefix']}.json"
        state_path = options["state"] or default_state
        try:
            fleet = FleetSimulator(
                base_url=options["base_url"],
                operator_token=token,
                devices=options["devices"],
                groups=options["groups"],
                prefix=options["prefix"],
                device_type=options["device_type"],
                firmware_version=options["firmware_version"],
                interval=options["interval"],
                jitter=options["jitter"],
                metrics=tuple(name.strip() for name in options["metrics"].split(",") if name.strip()),
                alert_rate=options["alert_rate"],
                failure_rate=options["failure_rate"],
                silence_rate=options["silence_rate"],
                ota=not options["no_ota"],
                ota_poll_interval=options["ota_poll_interval"],
                ota_idle_poll_interval=options["ota_idle_poll_interval"],
                seed=options["seed"],
                state_path=state_path,
                transport=options["transport"],
                mqtt_url=options["mqtt_url"],
                max_connections=options["max_connections"],
                idempotency=not options["no_idempotency"],
                summary_interval=options["summary_interval"],
                on_summary=self.stdout.write,
            )
            state_load(state_path)  # a broken state file stops us before anything is sent
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

        hot = sum(plan.hot for plan in fleet.plan)
        failing = sum(plan.ota_plan == "fail" for plan in fleet.plan)
        silent = sum(plan.ota_plan == "silent" for plan in fleet.plan)
        self.stdout.write(
            f"Simulating {fleet.device_count} devices ({options['prefix']}-0..{fleet.device_count - 1}, "
            f"{fleet.groups} groups) against {fleet.base_url}: {hot} hot, {failing} failing and {silent} silent "
            f"on updates (seed {fleet.seed}); tokens in {state_path}."
            + (f" Devices connect to {options['mqtt_url']}." if options["transport"] == "mqtt" else "")
        )
        try:
            registration = fleet.register()
        except Exception as exc:
            raise CommandError(f"registration failed: {exc}") from exc
        self.stdout.write(
            f"Registered in {registration.seconds:.1f}s: {registration.created} new, {registration.existing} known."
        )
        if registration.token_unknown:
            shown = ", ".join(registration.token_unknown[:10])
            more = f" and {len(registration.token_unknown) - 10} more" if len(registration.token_unknown) > 10 else ""
            self.stderr.write(
                self.style.WARNING(
                    f"{len(registration.token_unknown)} devices are already registered but their tokens are not in "
                    f"{state_path} (the platform shows a token only at creation): {shown}{more}. They are left out; "
                    "use the state file of the run that registered them, another --prefix, or delete those devices."
                )
            )
        if not fleet.devices:
            raise CommandError("no device to run")

        self.stdout.write("Running" + (f" for {options['duration']:.0f}s" if options["duration"] else " until Ctrl-C"))
        stats = run_coroutine(fleet.arun(duration=options["duration"], handle_signals=True))
        self.stdout.write("Final: " + stats.summary_line())
        reasons: dict[str, int] = {}
        for device in stats.per_device:
            for reason in device.update_reasons.values():
                reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1])[:10]:
            self.stdout.write(f"  {count} x {reason}")
        if stats.auth_failed or stats.crashed:
            self.stderr.write(
                self.style.WARNING(f"{stats.auth_failed} devices stopped on 401/403, {stats.crashed} crashed")
            )
        if options["json_path"]:
            path = options["json_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stats.as_dict(), indent=1, sort_keys=True))
            self.stdout.write(f"Stats written to {path}")

    def _operator_token(self, username: str) -> str:
        out = StringIO()
        call_command("create_api_token", username, stdout=out, stderr=StringIO())
        return out.getvalue().strip().splitlines()[-1]
