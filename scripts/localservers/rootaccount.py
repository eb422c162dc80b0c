"""Running PostgreSQL when the launcher is root, which PostgreSQL refuses.

An unprivileged system account runs initdb/postgres, and permissions are widened
only as far as that account needs (see "Running as root" in scripts/devservices.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from .processes import DevServicesError

# The same name pgserver itself uses, so an existing account is reused.
PG_ROOT_ACCOUNT = "pgserver"


def root_account():
    """pwd entry of the account postgres runs as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_ROOT_ACCOUNT)
    commands = [
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_ROOT_ACCOUNT],
        ["adduser", "-S", "-D", "-H", PG_ROOT_ACCOUNT],  # busybox / Alpine
    ]
    errors = []
    for command in commands:
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            continue
        errors.append(result.stderr.strip())
        with contextlib.suppress(KeyError):  # also covers a concurrent creation
            return pwd.getpwnam(PG_ROOT_ACCOUNT)
    raise DevServicesError(
        "running as root: PostgreSQL needs an unprivileged account, "
        f"but creating user {PG_ROOT_ACCOUNT!r} failed: {'; '.join(errors) or 'no useradd/adduser'}"
    )


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod((mode | bits) & 0o7777)


def make_traversable(path: Path) -> None:
    """Give "others" search permission on every parent of ``path``."""
    for parent in path.resolve().parents:
        _add_mode(parent, 0o001)


def make_tree_readable(top: Path) -> None:
    """o+rx on directories, o+r on files (o+x if owner-executable) under ``top``."""
    if not top.is_dir():
        return
    make_traversable(top)
    _add_mode(top, 0o005)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            _add_mode(Path(dirpath, name), 0o005)
        for name in filenames:
            file = Path(dirpath, name)
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            _add_mode(file, 0o005 if mode & 0o100 else 0o004)
