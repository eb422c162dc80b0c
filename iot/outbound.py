"""Outbound HTTP POSTs to URLs that users supply (webhooks), safe against SSRF.

A webhook URL is chosen by whoever configures a channel, and the worker that
delivers it sits inside our network: unchecked, `http://169.254.169.254/...` would
post (and report the status of) requests to the cloud metadata service, and
`http://localhost:6379` or `http://10.0.0.5/admin` to our own services. So:

* **At creation** (`outbound_url_validate`, raises `ValueError`): http or https only,
  a host, no credentials in the URL (`user:pass@`: put secrets in a header, the URL
  is shown to operators), at most 2,048 characters, no whitespace or control
  characters; and the host must resolve, to allowed addresses only (all of them: a
  name with one public and one private address is refused).
* **At delivery** (`outbound_post`), again, because DNS may answer differently now
  (a record changed, or an attacker's name rebinding to 127.0.0.1 after passing the
  first check): the host is resolved once, every address is checked, and the TCP
  connection is made to a checked address by a network backend that ignores the host
  name it is handed (`_PinnedBackend`), so nothing resolves the name a second time
  between check and connect. The request itself still names the host: Host header,
  TLS SNI and certificate verification all use the URL's name (httpcore takes them
  from the URL; the backend only swaps the socket's destination).

Refused addresses (`ipaddress` properties, after unwrapping an IPv4 address
embedded in IPv6: IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
`2002::/16`): unspecified, multicast and link-local (169.254.0.0/16 with the metadata
address, fe80::/10) always; loopback, private (RFC 1918, ULA fc00::/7, and the other
special-purpose ranges Python lists), reserved, IPv6 site-local and anything not
globally routable (e.g. 100.64.0.0/10) unless `ALERT_WEBHOOK_ALLOW_PRIVATE=1`
(development, or receivers on your own network). Link-local stays refused with the
flag on: no webhook receiver lives there, and it is where the metadata service hands
out cloud credentials. Proxies from the environment (`HTTP_PROXY`) are not used: a
proxy would resolve and connect to the name itself, out of the guard's reach.

No redirects are followed: a 3xx is a failure (`OutboundHTTPStatusError`, not
retryable), since following one would send the request to a URL nobody validated.

Timeouts: `WEBHOOK_CONNECT_TIMEOUT_SECONDS` (2 s) for DNS, the TCP connect and the
TLS handshake each; `WEBHOOK_READ_TIMEOUT_SECONDS` (5 s) for each read and write;
and the whole call is bounded by their sum (7 s): every socket operation gets the
smaller of its own timeout and the time left, because per-read timeouts alone let a
server that dribbles a header byte every 4 s hold a worker for ever. DNS runs on a
small thread pool so its wait is bounded too (the system resolver's own retries can
take 10 s or more); a lookup that overruns is abandoned, not cancelled.

Errors are typed so the caller can classify them: `OutboundRefused` (the guard, or
a malformed URL; permanent; also a `ValueError`), `OutboundTimeout`,
`OutboundConnectionError` (DNS failure, refused, reset, TLS failure; retryable) and
`OutboundHTTPStatusError` (`status_code`; retryable for 408, 425, 429 and 5xx, with
`retry_after_seconds` when the response said so). All are `OutboundError` with a
`retryable` attribute.

Why httpcore under httpx rather than an `httpx.Client`: the client has no public
hook for the network backend (`httpx.HTTPTransport` builds its own pool), and
httpcore's `ConnectionPool(network_backend=...)` is public API. The other way,
putting the IP in the URL with a `Host` header and the `sni_hostname` extension,
pins the address too but leaves the per-read deadline out, and an `httpx.Client`
reads proxies from the environment unless told not to. httpcore is installed with
httpx (httpx 0.28 requires httpcore 1.x). Each call uses a pool of its own (a new
connection, no keep-alive), since its backend carries that call's checked address and
deadline; reusing connections across calls would need a pool per (name, address) and
per-call deadlines on reused sockets, not worth it at webhook rates. Measured on this
2-core machine under a load average of 14-18, client and server both local: 0.9 ms
median per plain-HTTP POST (about 650 a second from one thread), 5 ms over HTTPS (a
full TLS 1.3 handshake, P-256 certificate, each time).
"""

import email.utils
import ipaddress
import os
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

import certifi
import httpcore
import httpx
from django.conf import settings

_URL_MAX_LENGTH = 2048
_MAX_ADDRESSES_TRIED = 2  # a name with an unreachable first address (IPv6 without a route, say) gets one more try
_SNIPPET_BYTES = 512
_USER_AGENT = b"iot-fleet-platform-webhook/1"
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundError(Exception):
    """A delivery that did not get a 2xx; `retryable` says whether trying again later can help."""

    retryable = True


class OutboundRefused(OutboundError, ValueError):
    """The URL, or an address its host resolves to, is not allowed. Permanent."""

    retryable = False


class OutboundTimeout(OutboundError):
    """DNS, connect, a read or write, or the whole call ran out of time."""


class OutboundConnectionError(OutboundError):
    """The host does not resolve, refused or dropped the connection, or failed TLS."""


class OutboundHTTPStatusError(OutboundError):
    """The service answered with a status outside 2xx (a redirect included: none is followed)."""

    def __init__(self, message: str, *, status_code: int, retry_after_seconds: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_seconds = retry_after_seconds
        self.retryable = status_code in _RETRYABLE_STATUSES or status_code >= 500


@dataclass(frozen=True)
class OutboundResult:
    status_code: int
    elapsed_seconds: float  # from the call to the response's status line, DNS included
    address: str  # the IP address the request went to


# --- the URL and its addresses -------------------------------------------------------


def _parse(url: object) -> httpx.URL:
    if not isinstance(url, str) or not url:
        raise OutboundRefused("the URL must be a non-empty string")
    if len(url) > _URL_MAX_LENGTH:
        raise OutboundRefused(f"the URL is longer than {_URL_MAX_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise OutboundRefused("the URL contains whitespace or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise OutboundRefused(f"the URL does not parse: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise OutboundRefused(f"the URL's scheme must be http or https, not {parsed.scheme or 'none'!r}")
    if not parsed.host:
        raise OutboundRefused("the URL has no host")
    if parsed.userinfo:
        raise OutboundRefused("the URL must not carry credentials (user:password@); send them in a header")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise OutboundRefused("the URL's port must be 1-65535")
    return parsed


def _port(parsed: httpx.URL) -> int:
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def _reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_private: bool) -> str | None:
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if allow_private:
        return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if not ip.is_global:
        return "an address that is not publicly routable"
    return None


def _address_refusal(address: str, *, allow_private: bool) -> str | None:
    """Why `address` may not be connected to, or None if it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return "not an IP address"
    checked: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            checked = [ip.ipv4_mapped]
        elif ip in _NAT64:
            checked = [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
        elif ip.sixtofour is not None:
            checked = [ip, ip.sixtofour]
    for candidate in checked:
        if reason := _reason(candidate, allow_private=allow_private):
            return reason
    return None


_resolver_lock = threading.Lock()
_resolver: tuple[int, ThreadPoolExecutor] | None = None


def _resolver_pool() -> ThreadPoolExecutor:
    """The lookup threads of this process (made after a fork: a parent's threads don't survive one)."""
    global _resolver
    with _resolver_lock:
        if _resolver is None or _resolver[0] != os.getpid():
            _resolver = (os.getpid(), ThreadPoolExecutor(max_workers=4, thread_name_prefix="outbound-dns"))
        return _resolver[1]


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _resolve(host: str, port: int, *, timeout: float) -> list[str]:
    """Every address `host` resolves to, in the resolver's order; bounded by `timeout`."""
    future = _resolver_pool().submit(_getaddrinfo, host, port)
    try:
        addresses = future.result(timeout=timeout)
    except FutureTimeout:
        raise OutboundTimeout(f"resolving {host} took longer than {timeout:g}s") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundConnectionError(f"{host} does not resolve: {exc}") from None
    if not addresses:
        raise OutboundConnectionError(f"{host} does not resolve")
    return addresses


def _checked_addresses(parsed: httpx.URL, *, timeout: float) -> list[str]:
    host = parsed.raw_host.decode("ascii")
    addresses = _resolve(host, _port(parsed), timeout=timeout)
    allow_private = settings.ALERT_WEBHOOK_ALLOW_PRIVATE
    for address in addresses:
        if reason := _address_refusal(address, allow_private=allow_private):
            # The address itself is not echoed for a name: it would map the internal network for whoever asks.
            subject = f"{host} is" if address == host else f"{host} resolves to"
            hint = ""
            if not allow_private and _address_refusal(address, allow_private=True) is None:
                hint = " (ALERT_WEBHOOK_ALLOW_PRIVATE=1 allows private ones)"
            raise OutboundRefused(f"{subject} {reason}: webhooks may only reach public addresses{hint}")
    return addresses


def outbound_url_validate(url: str) -> None:
    """Raise `ValueError` (an `OutboundRefused`) with a message for the user if `url` may not be a webhook.

    Resolves the host (bounded by `WEBHOOK_CONNECT_TIMEOUT_SECONDS`): a host that does not
    resolve, or not in time, is refused too, since nothing could be delivered to it now.
    """
    parsed = _parse(url)
    try:
        _checked_addresses(parsed, timeout=settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS)
    except OutboundRefused:
        raise
    except OutboundError as exc:
        raise OutboundRefused(str(exc)) from None


# --- the request ---------------------------------------------------------------------


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every operation also ends at the call's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self._inner = inner
        self._deadline = deadline

    def _timeout(self, timeout: float | None, error: type[Exception]) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise error("the call's overall deadline passed")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._timeout(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked `address` whatever host name httpcore passes (so it is never resolved again)."""

    def __init__(self, address: str, deadline: float):
        self._address = address
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise httpcore.ConnectTimeout("the call's overall deadline passed")
        stream = self._inner.connect_tcp(
            self._address,
            port,
            timeout=remaining if timeout is None else min(timeout, remaining),
            local_address=local_address,
            socket_options=socket_options,
        )
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("webhooks are not sent over unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@cache
def _ssl_context() -> ssl.SSLContext:
    """Certificates checked against certifi's CA bundle (what httpx uses), hostname included."""
    return ssl.create_default_context(cafile=certifi.where())


def _retry_after(value: bytes | None) -> float | None:
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _snippet(response: httpcore.Response) -> str:
    """Up to 512 bytes of an error response's body, for the operator; whatever arrives before an error."""
    data = b""
    try:
        for chunk in response.iter_stream():
            data += chunk
            if len(data) >= _SNIPPET_BYTES:
                break
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
        pass
    return data[:_SNIPPET_BYTES].decode("utf-8", "replace").strip()


def _send(
    *, parsed: httpx.URL, address: str, headers: list[tuple[bytes, bytes]], body: bytes, started: float, deadline: float
) -> OutboundResult:
    connect_timeout = settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS
    read_timeout = settings.WEBHOOK_READ_TIMEOUT_SECONDS
    url = httpcore.URL(scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path or b"/")
    timeouts = {"connect": connect_timeout, "read": read_timeout, "write": read_timeout, "pool": connect_timeout}
    with httpcore.ConnectionPool(
        ssl_context=_ssl_context(), network_backend=_PinnedBackend(address, deadline), max_connections=1, retries=0
    ) as pool:
        with pool.stream("POST", url, headers=headers, content=body, extensions={"timeout": timeouts}) as response:
            elapsed = time.monotonic() - started
            status = response.status
            if 200 <= status < 300:
                return OutboundResult(status_code=status, elapsed_seconds=elapsed, address=address)
            response_headers = {name.lower(): value for name, value in response.headers}
            if 300 <= status < 400:
                location = response_headers.get(b"location", b"").decode("latin-1")[:200]
                raise OutboundHTTPStatusError(
                    f"HTTP {status}: redirects are not followed (Location: {location or 'none'})", status_code=status
                )
            snippet = _snippet(response)
            raise OutboundHTTPStatusError(
                f"HTTP {status}" + (f": {snippet}" if snippet else ""),
                status_code=status,
                retry_after_seconds=_retry_after(response_headers.get(b"retry-after")),
            )


def outbound_post(
    *, url: str, body: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json"
) -> OutboundResult:
    """POST `body` to `url` through the SSRF guard; a 2xx returns, anything else raises an `OutboundError`.

    `headers` are sent as given (a signature, an idempotency key), except Host,
    Content-Length and Content-Type, which this function sets.
    """
    started = time.monotonic()
    connect_timeout = settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS
    deadline = started + connect_timeout + settings.WEBHOOK_READ_TIMEOUT_SECONDS
    parsed = _parse(url)
    addresses = _checked_addresses(parsed, timeout=connect_timeout)
    owned = {"host", "content-length", "content-type"}
    request_headers = [(b"Host", parsed.netloc), (b"User-Agent", _USER_AGENT)]
    request_headers += [(b"Content-Type", content_type.encode("latin-1")), (b"Content-Length", b"%d" % len(body))]
    request_headers += [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in (headers or {}).items()
        if name.lower() not in owned
    ]
    last_error: OutboundError | None = None
    for address in addresses[:_MAX_ADDRESSES_TRIED]:
        try:
            return _send(
                parsed=parsed, address=address, headers=request_headers, body=body, started=started, deadline=deadline
            )
        except (httpcore.ConnectTimeout, httpcore.ConnectError) as exc:
            # Nothing was sent: the next address may answer (within the same deadline).
            kind = OutboundTimeout if isinstance(exc, httpcore.ConnectTimeout) else OutboundConnectionError
            last_error = kind(f"connecting to {parsed.host} ({address}) failed: {exc or type(exc).__name__}")
        except httpcore.TimeoutException as exc:
            raise OutboundTimeout(f"{parsed.host} did not answer in time: {exc or type(exc).__name__}") from None
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise OutboundConnectionError(f"{parsed.host}: {type(exc).__name__}: {exc}") from None
    assert last_error is not None
    raise last_error
