"""The SSRF-safe webhook POST: refusals at creation and at delivery, against real local HTTP and HTTPS servers."""

import datetime
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iot import outbound
from iot.outbound import (
    OutboundConnectionError,
    OutboundHTTPStatusError,
    OutboundRefused,
    OutboundTimeout,
    outbound_post,
    outbound_url_validate,
)
from iot.testing.processes import free_port


@pytest.fixture(autouse=True)
def webhook_settings(settings):
    settings.ALERT_WEBHOOK_ALLOW_PRIVATE = False
    settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS = 2.0
    settings.WEBHOOK_READ_TIMEOUT_SECONDS = 5.0
    return settings


@pytest.fixture
def dns(monkeypatch) -> dict[str, list[list[str]]]:
    """A resolver of the test's own: `dns[name]` is a list of answers, one per lookup (the last one repeats)."""
    answers: dict[str, list[list[str]]] = {}
    lookups: list[str] = []

    def getaddrinfo(host: str, port: int) -> list[str]:
        lookups.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        queue = answers[host]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    monkeypatch.setattr(outbound, "_getaddrinfo", getaddrinfo)
    answers["lookups"] = lookups  # type: ignore[assignment]
    return answers


# --- validation at creation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/hook", "127.0.0.1 is a loopback address"),
        ("http://[::1]:8080/", "::1 is a loopback address"),
        ("http://localhost/", "localhost resolves to a loopback address"),
        ("http://2130706433/", "resolves to a loopback address"),  # decimal 127.0.0.1
        ("http://10.1.2.3/", "a private address"),
        ("http://172.16.0.1/", "a private address"),
        ("http://192.168.1.10/", "a private address"),
        ("http://[fd00::1]/", "a private address"),
        ("http://100.64.0.1/", "not publicly routable"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[::ffff:10.0.0.1]/", "a private address"),
        ("http://[64:ff9b::7f00:1]/", "a loopback address"),
        ("http://[2002:a00:1::]/", "a private address"),
        ("http://0.0.0.0:8000/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("ftp://93.184.216.34/", "scheme must be http or https"),
        ("file:///etc/passwd", "scheme must be http or https"),
        ("http://user:secret@93.184.216.34/", "must not carry credentials"),
        ("http:///nohost", "no host"),
        ("http://93.184.216.34:0/", "port must be 1-65535"),
        ("http://93.184.216.34:70000/", "port must be 1-65535"),
        ("http://93.184.216.34/a b", "whitespace or control characters"),
        ("http://93.184.216.34/\r\nX-Injected: 1", "whitespace or control characters"),
        ("http://93.184.216.34/" + "a" * 2048, "longer than 2048"),
        ("", "non-empty string"),
        ("no-scheme.example/hook", "scheme"),
    ],
)
def test_validate_refuses_with_a_clear_message(url, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        outbound_url_validate(url)


def test_validate_hints_at_the_setting_only_where_it_helps():
    with pytest.raises(OutboundRefused, match="ALERT_WEBHOOK_ALLOW_PRIVATE=1"):
        outbound_url_validate("http://10.0.0.1/")
    with pytest.raises(OutboundRefused) as refused:
        outbound_url_validate("http://169.254.169.254/")
    assert "ALLOW_PRIVATE" not in str(refused.value) and not refused.value.retryable


@pytest.mark.parametrize("url", ["http://93.184.216.34/hook", "https://[2606:4700:4700::1111]:8443/x?y=1"])
def test_validate_accepts_public_addresses(url):
    assert outbound_url_validate(url) is None


def test_a_name_with_any_private_address_is_refused(dns):
    dns["mixed.test"] = [["93.184.216.34", "10.0.0.7"]]
    with pytest.raises(OutboundRefused, match="mixed.test resolves to a private address") as refused:
        outbound_url_validate("https://mixed.test/hook")
    assert "10.0.0.7" not in str(refused.value)  # an internal address is not echoed back
    dns["public.test"] = [["93.184.216.34", "2606:4700:4700::1111"]]
    outbound_url_validate("https://public.test/hook")


def test_an_unresolvable_name_is_refused(dns):
    with pytest.raises(ValueError, match="nowhere.test does not resolve"):
        outbound_url_validate("https://nowhere.test/hook")


def test_a_hanging_resolver_is_bounded(monkeypatch, webhook_settings):
    webhook_settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS = 0.2
    release = threading.Event()
    monkeypatch.setattr(outbound, "_getaddrinfo", lambda host, port: release.wait(10) and [])
    started = time.monotonic()
    try:
        with pytest.raises(ValueError, match="took longer than 0.2s"):
            outbound_url_validate("https://slow-dns.test/")
        assert time.monotonic() - started < 1.5
        with pytest.raises(OutboundTimeout):
            outbound_post(url="https://slow-dns.test/", body=b"{}")
    finally:
        release.set()


def test_the_setting_allows_private_but_never_link_local_unspecified_or_multicast(webhook_settings):
    webhook_settings.ALERT_WEBHOOK_ALLOW_PRIVATE = True
    for url in ["http://127.0.0.1:9/", "http://[::1]/", "http://10.0.0.1/", "http://[fd00::1]/", "http://100.64.0.1/"]:
        outbound_url_validate(url)
    for url, message in [
        ("http://169.254.169.254/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
    ]:
        with pytest.raises(OutboundRefused, match=message):
            outbound_url_validate(url)


# --- delivery against real local servers ---------------------------------------------------


class Recorder:
    def __init__(self):
        self.requests: list[dict] = []
        self.status = 200
        self.headers: dict[str, str] = {}
        self.body = b"ok"
        self.sni: list[str | None] = []


def handler_for(recorder: Recorder) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            recorder.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
            )
            self.send_response(recorder.status)
            for name, value in recorder.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(recorder.body)))
            self.end_headers()
            self.wfile.write(recorder.body)

        def log_message(self, *args):
            pass

    return Handler


@contextmanager
def serving(context: ssl.SSLContext | None = None) -> Iterator[tuple[int, Recorder]]:
    recorder = Recorder()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_for(recorder))
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], recorder
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[tuple[int, Recorder]]:
    with serving() as running:
        yield running


@pytest.fixture
def private_allowed(webhook_settings):
    webhook_settings.ALERT_WEBHOOK_ALLOW_PRIVATE = True


def test_post_delivers_the_body_with_its_headers(server, private_allowed):
    port, recorder = server
    result = outbound_post(
        url=f"http://127.0.0.1:{port}/hook?x=1",
        body=b'{"alert_ids": [1]}',
        headers={"X-Signature": "abc", "Host": "evil.test", "Content-Length": "1"},
    )
    assert result.status_code == 200 and result.address == "127.0.0.1" and 0 < result.elapsed_seconds < 5
    (request,) = recorder.requests
    assert request["path"] == "/hook?x=1" and request["body"] == b'{"alert_ids": [1]}'
    headers = request["headers"]
    assert headers["Content-Type"] == "application/json" and headers["X-Signature"] == "abc"
    assert headers["Host"] == f"127.0.0.1:{port}" and headers["Content-Length"] == "18"


def test_connects_to_the_resolved_address_with_the_name_in_host(server, private_allowed, dns):
    port, recorder = server
    dns["webhook.test"] = [["127.0.0.1"]]
    result = outbound_post(url=f"http://webhook.test:{port}/in", body=b"{}")
    assert result.status_code == 200 and result.address == "127.0.0.1"
    assert recorder.requests[0]["headers"]["Host"] == f"webhook.test:{port}"
    assert dns["lookups"] == ["webhook.test"]  # resolved once; the connection used that answer


def test_loopback_is_refused_at_delivery_and_nothing_is_sent(server):
    port, recorder = server
    with pytest.raises(OutboundRefused, match="loopback") as refused:
        outbound_post(url=f"http://127.0.0.1:{port}/hook", body=b"{}")
    assert not refused.value.retryable and recorder.requests == []


def test_dns_rebinding_after_validation_is_refused_at_delivery(server, dns):
    port, recorder = server
    dns["rebind.test"] = [["93.184.216.34"], ["127.0.0.1"]]  # public when checked, loopback when delivering
    outbound_url_validate(f"http://rebind.test:{port}/hook")
    with pytest.raises(OutboundRefused, match="rebind.test resolves to a loopback address"):
        outbound_post(url=f"http://rebind.test:{port}/hook", body=b"{}")
    assert recorder.requests == []


def test_metadata_address_behind_a_name_is_refused_even_with_the_setting(server, private_allowed, dns):
    dns["metadata.test"] = [["::ffff:169.254.169.254"]]
    with pytest.raises(OutboundRefused, match="link-local"):
        outbound_post(url="http://metadata.test/latest/meta-data/", body=b"{}")


def test_redirects_are_not_followed(server, private_allowed):
    port, recorder = server
    recorder.status, recorder.headers = 302, {"Location": f"http://127.0.0.1:{port}/elsewhere"}
    with pytest.raises(OutboundHTTPStatusError, match="redirects are not followed") as failed:
        outbound_post(url=f"http://127.0.0.1:{port}/hook", body=b"{}")
    assert failed.value.status_code == 302 and not failed.value.retryable
    assert [r["path"] for r in recorder.requests] == ["/hook"]


@pytest.mark.parametrize(
    ("status", "headers", "retryable", "retry_after"),
    [
        (500, {}, True, None),
        (503, {"Retry-After": "7"}, True, 7.0),
        (429, {"Retry-After": "120"}, True, 120.0),
        (408, {}, True, None),
        (404, {}, False, None),
        (400, {}, False, None),
    ],
)
def test_error_statuses_are_classified(server, private_allowed, status, headers, retryable, retry_after):
    port, recorder = server
    recorder.status, recorder.headers, recorder.body = status, headers, b"the receiver says no"
    with pytest.raises(OutboundHTTPStatusError) as failed:
        outbound_post(url=f"http://127.0.0.1:{port}/hook", body=b"{}")
    error = failed.value
    assert (error.status_code, error.retryable, error.retry_after_seconds) == (status, retryable, retry_after)
    assert str(error) == f"HTTP {status}: the receiver says no"


def test_connection_refused_is_a_retryable_connection_error(private_allowed):
    with pytest.raises(OutboundConnectionError) as failed:
        outbound_post(url=f"http://127.0.0.1:{free_port()}/hook", body=b"{}")
    assert failed.value.retryable


def test_a_second_address_is_tried_when_the_first_refuses(server, private_allowed, dns):
    port, recorder = server
    dns["two.test"] = [["127.0.0.2", "127.0.0.1"]]  # nothing listens on 127.0.0.2:port
    result = outbound_post(url=f"http://two.test:{port}/hook", body=b"{}")
    assert result.address == "127.0.0.1" and len(recorder.requests) == 1


@contextmanager
def raw_server(behaviour) -> Iterator[int]:
    """A TCP server whose connections get `behaviour(conn, stop)` in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    threads = []

    def accept():
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=behaviour, args=(conn, stop), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for thread in threads:
            thread.join(5)


def never_answers(conn, stop):
    with conn:
        stop.wait(30)


def dribbles(conn, stop):
    """Answers a header byte every 50 ms, for ever: each read succeeds well within the read timeout."""
    with conn:
        conn.recv(65536)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.05):
                conn.sendall(b"X")
        except OSError:
            pass


def test_a_service_that_never_answers_times_out_at_the_read_timeout(private_allowed, webhook_settings):
    webhook_settings.WEBHOOK_READ_TIMEOUT_SECONDS = 0.3
    with raw_server(never_answers) as port:
        started = time.monotonic()
        with pytest.raises(OutboundTimeout) as failed:
            outbound_post(url=f"http://127.0.0.1:{port}/hook", body=b"{}")
        took = time.monotonic() - started
    assert failed.value.retryable
    assert 0.25 < took < 1.5, took


def test_a_dribbling_service_is_cut_off_at_the_overall_deadline(private_allowed, webhook_settings):
    """Per-read timeouts alone would never fire here: every read gets a byte within 50 ms."""
    webhook_settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS = 0.2
    webhook_settings.WEBHOOK_READ_TIMEOUT_SECONDS = 0.3
    with raw_server(dribbles) as port:
        started = time.monotonic()
        with pytest.raises(OutboundTimeout):
            outbound_post(url=f"http://127.0.0.1:{port}/hook", body=b"{}")
        took = time.monotonic() - started
    assert 0.45 < took < 1.5, took


# --- HTTPS: the name's certificate and SNI over the pinned address ------------------------


@pytest.fixture
def tls(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A self-signed certificate for webhook.test; the client trusts it (and only it). Returns the server context."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webhook.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("webhook.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    client = ssl.create_default_context(cafile=str(cert_path))
    monkeypatch.setattr(outbound, "_ssl_context", lambda: client)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return server


def test_https_verifies_the_names_certificate_over_the_pinned_address(tls, private_allowed, dns):
    seen_sni: list[str | None] = []
    tls.sni_callback = lambda sock, server_name, context: seen_sni.append(server_name)
    dns["webhook.test"] = [["127.0.0.1"]]
    dns["other.test"] = [["127.0.0.1"]]
    with serving(tls) as (port, recorder):
        result = outbound_post(url=f"https://webhook.test:{port}/secure", body=b'{"ok": true}')
        assert result.status_code == 200 and result.address == "127.0.0.1"
        assert seen_sni == ["webhook.test"]
        assert recorder.requests[0]["headers"]["Host"] == f"webhook.test:{port}"
        # Same address, another name: the certificate is checked against the URL's name, so this fails.
        with pytest.raises(OutboundConnectionError, match="CERTIFICATE_VERIFY_FAILED.*Hostname mismatch"):
            outbound_post(url=f"https://other.test:{port}/secure", body=b"{}")
        assert len(recorder.requests) == 1
