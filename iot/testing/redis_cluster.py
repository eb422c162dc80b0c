"""A real Redis Cluster for tests: three `redis-server --cluster-enabled yes` primaries, slots assigned by
`redis-cli --cluster create`, in a temporary directory; stopped (and their files removed) afterwards.

About a second to start here. The servers run under `noeviction` and without persistence (a test's data).
"""

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis

CLUSTER_BUS_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000


def redis_cluster_binaries() -> tuple[str, str] | None:
    """(redis-server, redis-cli), or None when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports whose cluster bus port is free too (an ephemeral port + 10000 may be past 65535)."""
    ports: list[int] = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        start = 20_000 + probe.getsockname()[1] % 20_000
    for port in range(start, 50_000):
        if _port_free(port) and _port_free(port + CLUSTER_BUS_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports for a Redis Cluster")


def _wait(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis Cluster: timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def redis_cluster(*, nodes: int = 3) -> Iterator[list[str]]:
    """A running cluster of `nodes` primaries (no replicas); yields their `redis://` URLs."""
    binaries = redis_cluster_binaries()
    if binaries is None:
        raise RuntimeError("redis-server and redis-cli are needed for a Redis Cluster")
    server, cli = binaries
    directory = Path(tempfile.mkdtemp(prefix="iot-redis-cluster-"))
    ports = _free_ports(nodes)
    processes: list[subprocess.Popen] = []
    try:
        for port in ports:
            node_dir = directory / str(port)
            node_dir.mkdir()
            argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir)]
            argv += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ]
            argv += ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
            log = open(node_dir / "server.log", "wb")  # noqa: SIM115 - owned by the child
            processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        clients = [redis.Redis(port=port, socket_timeout=5) for port in ports]
        for client in clients:
            _wait(client.ping, timeout=10, what="the servers to answer")
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        for client in clients:
            _wait(lambda c=client: c.cluster("info")["cluster_state"] == "ok", timeout=30, what="cluster_state:ok")
        yield [f"redis://127.0.0.1:{port}/0" for port in ports]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(10)
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)
