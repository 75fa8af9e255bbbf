"""The worker's download refuses SSRF targets at every redirect hop and connects only to the
addresses it checked, against a real HTTP server on 127.0.0.1 (allowed through the policy,
as an operator would allow a MinIO)."""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shared.url_guard import UrlPolicy, check_url_resolves
from worker.pipeline.data_source import MAX_REDIRECTS, download_url, load_dataset
from worker.pipeline.errors import PipelineError

ROWS = [{"instruction": "a", "input": "b", "output": "c"}]
BODY = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
LOCAL = UrlPolicy(allow_http=True, allowed_private_hosts=frozenset({"127.0.0.1"}))


class LocalServer:
    """An http.server on 127.0.0.1: /data.jsonl is the dataset, `redirects` maps a path to
    the Location it answers with a 302, and `paths` records every request."""

    def __init__(self) -> None:
        self.redirects: dict[str, str] = {}
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                path = self.path.split("?")[0]
                if path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/data.jsonl":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(BODY)))
                    self.end_headers()
                    self.wfile.write(BODY)
                else:
                    self.send_error(404)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def data_paths(self) -> list[str]:
        return [p for p in self.paths if p.startswith("/data.jsonl")]


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    thread = threading.Thread(target=local.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield local
    local.httpd.shutdown()
    local.httpd.server_close()


def test_an_allowed_local_url_downloads(server: LocalServer, tmp_path: Path) -> None:
    path = download_url(f"{server.url}/data.jsonl", tmp_path, policy=LOCAL).path

    assert path.read_bytes() == BODY


def test_a_redirect_to_an_allowed_url_is_followed(server: LocalServer, tmp_path: Path) -> None:
    server.redirects["/start"] = "/hop"
    server.redirects["/hop"] = f"{server.url}/data.jsonl?X-Amz-Signature=s"

    dataset = load_dataset(f"{server.url}/start", allowed_local_dirs=[], url_policy=LOCAL,
                           download_dir=tmp_path)

    assert [dict(r) for r in dataset.rows] == ROWS
    assert server.paths == ["/start", "/hop", "/data.jsonl?X-Amz-Signature=s"]


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/?token=secret", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/?token=secret", "cloud metadata"),
        ("http://2130706433/data.jsonl?token=secret", "looks like an IP address"),
        ("http://10.0.0.1/data.jsonl?token=secret", "private"),
        ("file:///etc/passwd?token=secret", "only https"),
    ],
)
def test_a_redirect_to_a_refused_target_fails_at_that_hop(
    server: LocalServer, tmp_path: Path, location: str, reason: str
) -> None:
    server.redirects["/start"] = "/hop"
    server.redirects["/hop"] = location

    with pytest.raises(PipelineError, match=f"redirect 2 to .* refused: .*{reason}") as info:
        download_url(f"{server.url}/start?X-Amz-Signature=secret", tmp_path, policy=LOCAL)

    assert "secret" not in str(info.value)


def test_a_redirect_to_a_name_resolving_to_loopback_is_refused_before_connecting(
    server: LocalServer, tmp_path: Path
) -> None:
    # localhost is 127.0.0.1 too, but only "127.0.0.1" is allowed: the name is checked by
    # what it resolves to, when the connection is opened.
    server.redirects["/start"] = f"http://localhost:{server.port}/data.jsonl"

    with pytest.raises(PipelineError, match=r"redirect 1 to http://localhost:\d+/data.jsonl "
                                            r"refused: host localhost \(127.0.0.1\) is loopback"):
        download_url(f"{server.url}/start", tmp_path, policy=LOCAL)

    assert server.data_paths() == []


def test_a_redirect_to_plain_http_is_refused_unless_allowed(
    server: LocalServer, tmp_path: Path
) -> None:
    https_only = UrlPolicy(allowed_private_hosts=LOCAL.allowed_private_hosts)

    with pytest.raises(PipelineError, match="refused: only https URLs are allowed, not http:"):
        download_url(f"{server.url}/data.jsonl", tmp_path, policy=https_only)

    assert server.paths == []


def test_a_redirect_loop_stops_after_the_limit(server: LocalServer, tmp_path: Path) -> None:
    server.redirects["/loop"] = "/loop"

    with pytest.raises(PipelineError, match=f"more than {MAX_REDIRECTS} redirects"):
        download_url(f"{server.url}/loop", tmp_path, policy=LOCAL)

    assert len(server.paths) == MAX_REDIRECTS + 1


def _fake_dns(monkeypatch: pytest.MonkeyPatch, name: str, answers: list[str]) -> list[str]:
    """Simulates DNS for `name`, one answer per lookup (the last one repeats); other hosts
    (the numeric address the socket connects to) resolve as usual. Returns the lookup log."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return real(host, port, *args, **kwargs)
        lookups.append(answers[min(len(lookups), len(answers) - 1)])
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (lookups[-1], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_dns_rebinding_between_check_and_connect_is_refused(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = _fake_dns(monkeypatch, "rebind.example", ["93.184.215.14", "127.0.0.1"])
    url = f"http://rebind.example:{server.port}/data.jsonl"
    check_url_resolves(url, LOCAL)  # what the API did at submit: a public address, accepted

    with pytest.raises(PipelineError, match=r"host rebind.example \(127.0.0.1\) is loopback"):
        download_url(url, tmp_path, policy=LOCAL)

    assert lookups == ["93.184.215.14", "127.0.0.1"]
    assert server.paths == []


def test_the_connection_goes_to_the_address_that_was_checked(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that checked the name and then let the socket resolve it again would reach
    # 127.0.0.2, where nothing listens; the pinned one connects to the checked 127.0.0.1.
    lookups = _fake_dns(monkeypatch, "minio.internal", ["127.0.0.1", "127.0.0.2"])
    policy = UrlPolicy(allow_http=True, allowed_private_hosts=frozenset({"minio.internal"}))

    path = download_url(f"http://minio.internal:{server.port}/data.jsonl", tmp_path,
                        policy=policy).path

    assert path.read_bytes() == BODY
    assert lookups == ["127.0.0.1"]


def _self_signed_cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_to_a_pinned_address_still_sends_and_verifies_the_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed_cert(tmp_path, "files.internal")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_one() -> None:
        conn, _ = listener.accept()
        # The client rejects the self-signed certificate and hangs up.
        with contextlib.suppress(ssl.SSLError, OSError):
            context.wrap_socket(conn, server_side=True).close()

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    _fake_dns(monkeypatch, "files.internal", ["127.0.0.1"])
    policy = UrlPolicy(allowed_private_hosts=frozenset({"files.internal"}))

    with pytest.raises(PipelineError, match="CERTIFICATE_VERIFY_FAILED"):
        download_url(f"https://files.internal:{port}/data.jsonl", tmp_path, policy=policy)

    thread.join(5)
    listener.close()
    assert server_names == ["files.internal"]
