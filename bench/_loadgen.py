"""A lean HTTP/1.1 load generator (asyncio + uvloop, keep-alive, raw sockets).

Benchmarks share two cores with the server, so the client must cost far less
per request than the server does: a general-purpose client (httpx) spends
~1 ms of CPU per request, which would measure the client, not the platform.
This one writes pre-encoded requests and parses only the status line,
Content-Length and body.
"""

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import uvloop


@dataclass(frozen=True)
class Result:
    status: int
    latency_s: float
    body: bytes


def encode_request(method: str, path: str, *, host: str, token_header: str, body: object | None = None) -> bytes:
    payload = orjson.dumps(body) if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token_header}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    body = await reader.readexactly(length) if length else b""
    return status, body


async def _connection(host: str, port: int, requests: Iterator[bytes], results: list, gate: asyncio.Event):
    reader, writer = await asyncio.open_connection(host, port)
    await gate.wait()
    try:
        for request in requests:
            started = time.perf_counter()
            writer.write(request)
            status, body = await _read_response(reader)
            results.append(Result(status, time.perf_counter() - started, body))
    finally:
        writer.close()


async def _run(host: str, port: int, requests: Iterator[bytes], connections: int) -> tuple[list[Result], float]:
    results: list[Result] = []
    gate = asyncio.Event()
    tasks = [asyncio.create_task(_connection(host, port, requests, results, gate)) for _ in range(connections)]
    await asyncio.sleep(0.5)  # let every connection open before the clock starts
    began = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    return results, time.perf_counter() - began


def run_load(*, host: str, port: int, requests: Iterator[bytes], connections: int) -> tuple[list[Result], float]:
    """Send `requests` over `connections` keep-alive connections; returns results and wall time."""
    return uvloop.run(_run(host, port, iter(requests), connections))
