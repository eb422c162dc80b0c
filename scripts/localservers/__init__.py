"""Throw-away local PostgreSQL and Redis servers for `make run` / `make test` on a bare machine.

The command is scripts/devservices.py (its docstring is the user's manual); this
package is what it runs, one module per concern:

* ``runner``: the command line, starting what CMD needs, signals, the exit status;
* ``instance``: one launcher per ``var/<instance>`` (a lock) and the URLs a second one joins;
* ``postgres`` / ``redis_server``: the two servers (Redis is probed with redis-py);
* ``rootaccount``: the unprivileged account PostgreSQL needs when we are root;
* ``processes``: polling, parent-death signals, finding and stopping leftovers.
"""

from .postgres import Postgres
from .processes import DevServicesError
from .redis_server import Redis, redis_server_path
from .runner import main, run

__all__ = ["DevServicesError", "Postgres", "Redis", "main", "redis_server_path", "run"]
