"""The SSRF rules for data_path URLs: schemes, host grammar, refused address ranges and the
operator's exceptions. Resolution uses the machine's real resolver (localhost, literals)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from shared.url_guard import (
    UrlPolicy,
    UrlRefused,
    check_url,
    check_url_resolves,
    redact_url,
    refusal_reason,
    resolve_allowed,
)

STRICT = UrlPolicy()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.64.0.1", "not globally routable"),
        ("100.100.100.200", "cloud metadata"),
        ("192.0.0.192", "not globally routable"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "IPv6 form of 127.0.0.1, loopback"),
        ("::ffff:169.254.169.254", "IPv6 form of 169.254.169.254, a cloud metadata"),
        ("::7f00:1", "IPv6 form of 127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "IPv6 form of 169.254.169.254"),
        ("64:ff9b::a00:1", "IPv6 form of 10.0.0.1, private"),
        ("2002:7f00:1::", "IPv6 form of 127.0.0.1"),
        ("192.0.2.1", ""),  # documentation range
        ("198.18.0.1", ""),  # benchmarking range
        ("240.0.0.1", ""),  # reserved
    ],
)
def test_internal_addresses_are_refused(address: str, reason: str) -> None:
    refused = refusal_reason(ipaddress.ip_address(address))

    assert refused is not None and reason in refused


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_global_addresses_are_allowed(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "0x7f.1", "127.1",
             "127.0.0.01", "1.2.3.0x10", "0"]
)
def test_ip_addresses_in_unusual_notations_are_refused_before_any_lookup(host: str) -> None:
    with pytest.raises(UrlRefused, match="four decimal numbers"):
        check_url(f"https://{host}/train.jsonl", STRICT)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/x", "not http: .*TUNERY_ALLOW_HTTP_URLS"),
        ("file:///etc/passwd", "not file:"),
        ("gopher://example.com/", "not gopher:"),
        ("ftp://example.com/x", "not ftp:"),
        ("https:///x", "no host"),
        ("https://user:pw@example.com/x", "credentials"),
        ("https://user@example.com/x", "credentials"),
        ("https://example.com:99999/x", "malformed"),
        ("https://exa mple.com/x", "control character or whitespace"),
        ("https://ex%41mple.com/x", "not a valid host name"),
        ("https://bücher.example/x", "xn-- form"),
        ("https://[::1]/x", "loopback"),
        ("https://[fe80::1%25eth0]/x", "link-local"),
        ("https://[v1.example.com]/x", "only an IPv6 address goes in brackets"),
        ("https://[127.0.0.1]/x", "only an IPv6 address goes in brackets|malformed"),
        ("https://example.com/\ud800", "unpaired surrogate"),
    ],
)
def test_bad_urls_are_refused_without_dns(url: str, message: str) -> None:
    with pytest.raises(UrlRefused, match=message):
        check_url(url, STRICT)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9001/\r\nX: 1",
    "https://example.com/a\nb",
    "https://example.com/\tx",
    "https://exa\tmple.com/x",
    "https://example.com/x\x00",
    "https://example.com/x\x7f",
    "http://127.0.0.1 :9001/",
    "https://example.com/a b",
    "https://example.com/x ",
    " https://example.com/x",
    "https://example.com/x\u00a0",
    "https://example.com/x?q=\u2028",
])
def test_a_url_with_a_control_character_or_whitespace_is_refused(url: str) -> None:
    # urlsplit drops tab, CR and LF before the parts are looked at: the whole string counts.
    policy = UrlPolicy(allow_http=True, allowed_private_hosts=frozenset({"127.0.0.1"}))

    with pytest.raises(UrlRefused, match="control character or whitespace"):
        check_url(url, policy)


def test_an_https_url_with_a_public_name_passes_the_grammar() -> None:
    target = check_url("https://bucket.s3.amazonaws.com/d/train.jsonl?X-Amz-Signature=a", STRICT)

    assert (target.scheme, target.host, target.port) == ("https", "bucket.s3.amazonaws.com", 443)


def test_plain_http_passes_only_where_the_operator_allows_it() -> None:
    assert check_url("http://93.184.215.14/x", UrlPolicy(allow_http=True)).port == 80


def test_a_name_resolving_to_loopback_is_refused() -> None:
    with pytest.raises(UrlRefused, match=r"host localhost \(127.0.0.1\) is loopback"):
        check_url_resolves("https://localhost/x", STRICT)


def test_a_name_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(UrlRefused, match="does not resolve"):
        check_url_resolves("https://no-such-host.invalid/x", STRICT)


def test_allowed_private_hosts_resolve_to_their_addresses() -> None:
    policy = UrlPolicy(allowed_private_hosts=frozenset({"localhost", "127.0.0.1"}))

    assert "127.0.0.1" in check_url_resolves("https://LOCALHOST/x", policy)
    assert resolve_allowed("127.0.0.1", 9000, policy) == ["127.0.0.1"]


def test_allowing_one_private_host_allows_no_other() -> None:
    policy = UrlPolicy(allow_http=True, allowed_private_hosts=frozenset({"127.0.0.1"}))

    with pytest.raises(UrlRefused, match="cloud metadata"):
        check_url_resolves("http://169.254.169.254/", policy)
    with pytest.raises(UrlRefused, match="loopback"):
        check_url_resolves("http://127.0.0.2/", policy)


def test_policy_from_settings_normalizes_hosts() -> None:
    class FakeSettings:
        allow_http_urls = True
        allowed_private_url_hosts = ["MinIO.", "[::1]"]

    policy = UrlPolicy.from_settings(FakeSettings())

    assert policy.allow_http and policy.allowed_private_hosts == {"minio", "::1"}


def test_importing_url_guard_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import shared.url_guard; "
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] not in sys.stdlib_module_names and m.split('.')[0] != 'shared'))"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


def test_redact_url_drops_query_and_credentials() -> None:
    url = "https://u:p@bucket.example.com:8443/d/train.jsonl?X-Amz-Signature=secret"

    assert redact_url(url) == "https://bucket.example.com:8443/d/train.jsonl?…"
