"""One launcher per instance directory, and the URLs it shares with a second one.

``make web`` and ``make worker`` in two terminals: the first launcher owns the
servers (an exclusive lock, released by the kernel however it dies), the second
reads their URLs from ``urls.env`` and joins them without owning or stopping them.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .processes import DevServicesError


class InstanceBusy(DevServicesError):
    """Another launcher owns this instance's servers."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def urls_file(instance_dir: Path) -> Path:
    return instance_dir / "urls.env"


def write_urls(instance_dir: Path, urls: dict[str, str]) -> None:
    path = urls_file(instance_dir)
    path.write_text("".join(f"{name}={value}\n" for name, value in urls.items()))


def read_urls(instance_dir: Path) -> dict[str, str]:
    try:
        lines = urls_file(instance_dir).read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


class InstanceLock:
    """Exclusive lock on ``var/<instance>``, released automatically on death."""

    def __init__(self, instance_dir: Path) -> None:
        self.path = instance_dir / "launcher.lock"
        self.fd: int | None = None

    def __enter__(self) -> InstanceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InstanceBusy(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
