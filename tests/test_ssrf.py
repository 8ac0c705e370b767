"""The one SSRF guard (issue 15, finding 7): address rules, checked on the resolver's answer at
connect time, for webhooks and JWKS alike.

No test here connects outside 127.0.0.0/8: the rules are checked on resolver answers without
connecting, the consumer tests resolve a made-up host name through a fake `getaddrinfo`, and
every connect of the test process to another address fails at once (`loopback_only`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fluxbase.config import ConfigError, EndUserSettings, WebhookSettings, load_settings
from fluxbase.errors import IdentityProviderUnavailable
from fluxbase.services.identity import JwksCache
from fluxbase.webhooks.sender import Sender
from test_user_tokens import jwks_server, public_jwk

FAKE_HOST = "target.ssrf.test"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

# Refused by default: (address, why).
REFUSED = [
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("10.0.0.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("127.0.0.1", "loopback"),
    ("127.1.2.3", "loopback"),
    ("169.254.169.254", "link-local, cloud metadata"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.0.0.8", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.7", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("::ffff:100.64.0.1", "IPv4-mapped CGNAT"),
    ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
    ("::127.0.0.1", "IPv4-compatible (deprecated)"),
    ("::8.8.8.8", "IPv4-compatible (deprecated)"),
    ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
    ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("2002:a00:1::1", "6to4 of 10.0.0.1"),
    ("2002:7f00:1::1", "6to4 of 127.0.0.1"),
    ("2002:6440:1::1", "6to4 of 100.64.0.1"),
    ("2001::1", "Teredo"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("100::1", "discard-only"),
    ("fc00::1", "unique local"),
    ("fd00:ec2::254", "unique local, cloud metadata"),
    ("fe80::1", "link-local"),
    ("fe80::1%2", "link-local with a zone"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
]
ALLOWED = [
    "93.184.215.14",
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]


def _ssrf() -> Any:
    from fluxbase.security import ssrf  # the one guard module

    return ssrf


def _info(address: str, port: int) -> tuple[Any, ...]:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 4:
        return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
    return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))


class FakeDns:
    """Answers FAKE_HOST with the next prepared address list (the last one repeats); every other
    name goes to the real resolver."""

    def __init__(self, *answers: list[str]):
        self.answers = list(answers)
        self.asked = 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if (host.decode() if isinstance(host, bytes) else host) != FAKE_HOST:  # anyio asks in bytes
            return REAL_GETADDRINFO(host, port, *args, **kwargs)
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return [_info(a, int(port or 0)) for a in answer]


REAL_GETADDRINFO = socket.getaddrinfo


@pytest.fixture
async def loopback_only(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[str]]:
    """Every connect of this process outside 127.0.0.0/8 fails at once (and is recorded)."""
    loop = asyncio.get_running_loop()
    real = loop.sock_connect
    refused: list[str] = []

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        host = str(address[0]).split("%")[0]
        if ipaddress.ip_address(host) not in LOOPBACK:
            refused.append(host)
            raise OSError(f"test refuses to connect to {host}")
        await real(sock, address)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    yield refused


# -- the rules, on resolver answers (no connection) ---------------------------------------------


class _Inner:
    """A resolver with chosen answers, as aiohttp's resolvers return them."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        out = []
        for a in self.addresses:
            ip = ipaddress.ip_address(a.split("%")[0])
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            out.append({"hostname": host, "host": a, "port": port, "family": fam, "proto": 0, "flags": 0})
        return out

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(("address", "why"), REFUSED)
async def test_refused_answers(address: str, why: str) -> None:
    ssrf = _ssrf()
    assert ssrf.refusal(ipaddress.ip_address(address.split("%")[0]), ssrf.Policy()) is not None, why
    with pytest.raises(ssrf.ForbiddenTarget):
        await ssrf.GuardedResolver(ssrf.Policy(), inner=_Inner([address])).resolve(FAKE_HOST, 443)
    # A literal address in a URL is the same answer, given without a resolver.
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(ssrf.ForbiddenTarget):
        ssrf.check_literal(f"https://{host}/x", ssrf.Policy())


@pytest.mark.parametrize("address", ALLOWED)
async def test_public_answers_pass(address: str) -> None:
    ssrf = _ssrf()
    assert ssrf.refusal(ipaddress.ip_address(address), ssrf.Policy()) is None
    got = await ssrf.GuardedResolver(ssrf.Policy(), inner=_Inner([address])).resolve(FAKE_HOST, 443)
    assert [r["host"] for r in got] == [address]


async def test_mixed_answers_keep_only_the_allowed_ones() -> None:
    ssrf = _ssrf()
    got = await ssrf.GuardedResolver(ssrf.Policy(), inner=_Inner(["10.0.0.1", "8.8.8.8", "::1"])).resolve(
        FAKE_HOST, 80
    )
    assert [r["host"] for r in got] == ["8.8.8.8"]


async def test_allow_list_opens_exactly_what_it_names() -> None:
    ssrf = _ssrf()
    policy = ssrf.Policy.parse("127.0.0.1/32, 10.20.0.0/16")
    for ok in ("127.0.0.1", "::ffff:127.0.0.1", "10.20.3.4", "64:ff9b::a14:304"):
        assert ssrf.refusal(ipaddress.ip_address(ok), policy) is None, ok
    for refused in ("127.0.0.2", "::1", "10.21.0.1", "100.64.0.1", "169.254.169.254"):
        assert ssrf.refusal(ipaddress.ip_address(refused), policy) is not None, refused
    with pytest.raises(ValueError):
        ssrf.Policy.parse("not-a-network")


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://localhost/",
        "http://[::ffff:7f00:1]/",
        "http://[::ffff:127.0.0.1]:8080/",
        "http://[0:0:0:0:0:ffff:a9fe:a9fe]/latest/meta-data/",
    ],
)
async def test_other_spellings_of_refused_addresses(url: str, loopback_only: list[str]) -> None:
    """Names the system resolver turns into loopback, and IPv6 spellings of IPv4 literals, are
    refused by the guard; yarl refuses non-canonical IPv4 spellings before anything else. Either
    way nothing connects (a connect to 127.0.0.1:80 would fail differently)."""
    ssrf = _ssrf()
    client = ssrf.OutboundClient(ssrf.Policy())
    try:
        with pytest.raises((ssrf.ForbiddenTarget, aiohttp.InvalidURL)):
            async with client.request("GET", url, timeout_s=2):
                pass
    finally:
        await client.close()
    assert loopback_only == []


def test_allow_list_setting_and_the_old_switches() -> None:
    base = {
        "FLUXBASE_SECRET_KEY": "k" * 48,
        "FLUXBASE_DATABASE_URL": "postgresql://u@127.0.0.1/db",
        "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:9",
        "FLUXBASE_S3_ACCESS_KEY": "a",
        "FLUXBASE_S3_SECRET_KEY": "b",
    }
    ssrf = _ssrf()
    assert ssrf.Policy.of(load_settings(base)).allow == ()
    s = load_settings({**base, "FLUXBASE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.1/32,::1/128"})
    assert [str(n) for n in ssrf.Policy.of(s).allow] == ["127.0.0.1/32", "::1/128"]
    # The old per-consumer switches still work, as entries of the one list.
    s = load_settings({**base, "FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK": "true"})
    assert ssrf.refusal(ipaddress.ip_address("127.0.0.1"), ssrf.Policy.of(s)) is None
    assert ssrf.refusal(ipaddress.ip_address("10.0.0.1"), ssrf.Policy.of(s)) is not None
    s = load_settings({**base, "FLUXBASE_ENDUSER_JWKS_ALLOW_PRIVATE": "true"})
    assert ssrf.refusal(ipaddress.ip_address("10.0.0.1"), ssrf.Policy.of(s)) is None
    assert ssrf.refusal(ipaddress.ip_address("169.254.169.254"), ssrf.Policy.of(s)) is not None
    with pytest.raises(ConfigError):
        load_settings({**base, "FLUXBASE_OUTBOUND_ALLOW_NETWORKS": "10.0.0.0/33"})


# -- the consumers: the address checked is the address connected to ------------------------------


async def test_jwks_fetch_connects_only_to_the_address_it_checked(
    monkeypatch: pytest.MonkeyPatch, loopback_only: list[str]
) -> None:
    """Rebinding: the name answers a CGNAT address when checked, loopback when connected.

    The JWKS fetch used to check one lookup and connect after another (and let 100.64.0.0/10
    through); now the one answer it checks is the one it connects to, and it is refused."""
    key = ec.generate_private_key(ec.SECP256R1())
    with jwks_server() as server:
        server.keys = [public_jwk(key, "k")]
        port = int(server.url.split(":")[2].split("/")[0])
        for first in ("100.64.0.1", "64:ff9b::a00:1", "2002:a00:1::1", "192.0.0.8"):
            dns = FakeDns([first], ["127.0.0.1"])
            monkeypatch.setattr(socket, "getaddrinfo", dns)
            cache = JwksCache(EndUserSettings(jwks_timeout_s=2))
            with pytest.raises(IdentityProviderUnavailable):
                await cache.key(f"http://{FAKE_HOST}:{port}/.well-known/jwks.json", "k", "ES256")
            assert server.hits == 0, first
        assert loopback_only == []


async def test_jwks_allow_list_reaches_loopback_and_rechecks_every_connect(
    monkeypatch: pytest.MonkeyPatch, loopback_only: list[str]
) -> None:
    ssrf = _ssrf()
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"sub": "x"}, key, algorithm="ES256", headers={"kid": "k"})
    with jwks_server() as server:
        server.keys = [public_jwk(key, "k")]
        port = int(server.url.split(":")[2].split("/")[0])
        uri = f"http://{FAKE_HOST}:{port}/.well-known/jwks.json"
        monkeypatch.setattr(socket, "getaddrinfo", FakeDns(["127.0.0.1"], ["127.0.0.2"]))
        policy = ssrf.Policy.parse("127.0.0.1/32")
        found = await JwksCache(EndUserSettings(jwks_timeout_s=2), policy).key(uri, "k", "ES256")
        assert jwt.decode(token, found, algorithms=["ES256"])["sub"] == "x"
        assert server.hits == 1
        # The next connection's answer is 127.0.0.2, outside the list: refused, nothing sent.
        with pytest.raises(IdentityProviderUnavailable) as info:
            await JwksCache(EndUserSettings(jwks_timeout_s=2), policy).key(uri, "k", "ES256")
        assert "FLUXBASE_OUTBOUND_ALLOW_NETWORKS" in info.value.message
        assert server.hits == 1
    assert loopback_only == []


async def test_webhook_sender_uses_the_same_guard(
    monkeypatch: pytest.MonkeyPatch, loopback_only: list[str]
) -> None:
    ssrf = _ssrf()
    with jwks_server() as server:  # any local HTTP server does: it must see no request
        port = int(server.url.split(":")[2].split("/")[0])
        for first in ("100.64.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1"):
            monkeypatch.setattr(socket, "getaddrinfo", FakeDns([first], ["127.0.0.1"]))
            sender = Sender(WebhookSettings(timeout_s=2), ssrf.Policy())
            try:
                attempt = await sender.send(
                    f"http://{FAKE_HOST}:{port}/hook", "whsec_" + "A" * 44, "msg_1", "row.inserted", b"{}"
                )
            finally:
                await sender.close()
            assert not attempt.ok and attempt.error and attempt.error.startswith("refused"), attempt
        assert server.hits == 0
    assert loopback_only == []
