"""A simulated device fleet that plays against a running platform over its public API.

A client, not part of the server: it imports no domain app and talks to the platform only over
the wire (`iot.simulator.client.HttpTransport`; the `Transport` seam leaves room for MQTT).
`manage.py simulate_fleet` is its command line; tests and the demo use `FleetSimulator`.
"""

from iot.simulator.device import DeviceStats, SimulatedDevice
from iot.simulator.fleet import DevicePlan, FleetSimulator, FleetStats, RegistrationSummary
from iot.simulator.transport import DeviceIdentity, Download, Reply, Transport, TransportError

__all__ = [
    "DeviceIdentity",
    "DevicePlan",
    "DeviceStats",
    "Download",
    "FleetSimulator",
    "FleetStats",
    "RegistrationSummary",
    "Reply",
    "SimulatedDevice",
    "Transport",
    "TransportError",
]
