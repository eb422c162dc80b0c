"""The simulator's memory between runs: the device tokens, which the platform shows only once.

A registration of a known serial number answers `200` with the device and no token, so a
re-run of the same fleet (same `--prefix`) finds its tokens here, matched by device id (a
fresh database gives new ids and new tokens, and the file is updated). The file holds
credentials: it is written with mode 0600, atomically (a crash mid-write leaves the old one).
"""

import json
import os
import tempfile
from pathlib import Path

STATE_VERSION = 1


def state_load(path: Path | None) -> dict[str, dict]:
    """{serial number: {"id", "token"}} from the file (empty if there is none)."""
    if path is None or not path.exists():
        return {}
    data = json.loads(path.read_text())
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, dict):
        raise ValueError(f"{path} is not a simulate_fleet state file (no 'devices' object)")
    return {serial: entry for serial, entry in devices.items() if isinstance(entry, dict) and entry.get("token")}


def state_save(path: Path, *, base_url: str, devices: dict[str, dict]) -> None:
    """Write {serial: {"id", "token"}} (merged by the caller with what the file had)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"version": STATE_VERSION, "base_url": base_url, "devices": devices}, indent=1, sort_keys=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(payload)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
