"""sdnsup.discovery: the CC answer validator, the CC client on httpx.MockTransport, the backoff.

No network and no root: every HTTP exchange goes through ``httpx.MockTransport``, and every
sleep runs on trio's MockClock (virtual time), under an absolute virtual deadline.
"""

from __future__ import annotations

import email.utils
import errno
import ipaddress
import json
import logging
import socket
import ssl
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
import trio
import trio.testing

from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.discovery import (
    BACKOFF_CAP,
    DEFAULT_TTL,
    MAX_APS,
    MAX_TTL,
    MIN_TTL,
    CCClient,
    Directory,
    backoff_ceiling,
    discover,
    parse_answer,
    parse_retry_after,
)
from sdnsup.errors import BadAnswerError, ConfigError, DiscoveryError

CC = "https://cc.example:8443"
SECRET = "tok-5ecr3t-DO-NOT-LEAK"
TEST_DEADLINE = 100_000.0  # virtual seconds


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``fn`` on a MockClock that jumps ahead whenever every task sleeps."""

    async def main() -> Any:
        with trio.fail_after(TEST_DEADLINE):
            return await fn()

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def ap(i: int = 1, **fields: Any) -> dict[str, Any]:
    """One AP entry of a CC answer; ``field=DROP`` removes a field."""
    entry: dict[str, Any] = {"id": f"ap-{i}", "addr": f"10.77.0.{10 + i}", **fields}
    return {k: v for k, v in entry.items() if v is not DROP}


DROP = object()


def answer(*aps: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"aps": list(aps), **top}).encode()


def bad(body: bytes) -> str:
    with pytest.raises(BadAnswerError) as info:
        parse_answer(body)
    return str(info.value)


# --- parse_answer: valid answers --------------------------------------------------------------


def test_valid_answer_with_both_families_and_everything_set() -> None:
    body = answer(
        {
            "id": "ap-sh-1",
            "addr": "10.77.0.11",
            "addr6": "fd00::11",
            "probe": {"kind": "http", "port": 8080, "path": "/healthz"},
            "weight": 7,
        },
        {"id": "ap-v6", "addr6": "2001:db8::2"},
        ttl=120,
    )
    assert parse_answer(body) == Directory(
        aps=(
            AccessPoint(
                "ap-sh-1",
                ipaddress.IPv4Address("10.77.0.11"),
                ipaddress.IPv6Address("fd00::11"),
                ProbeSpec("http", 8080, "/healthz"),
                7,
            ),
            AccessPoint("ap-v6", addr6=ipaddress.IPv6Address("2001:db8::2")),
        ),
        ttl=120.0,
    )


def test_defaults_apply_and_null_means_absent() -> None:
    d = parse_answer(answer(ap(1), ap(2, addr6=None, probe=None, weight=None), ttl=None))
    assert d.ttl == DEFAULT_TTL == 60.0
    for entry in d.aps:
        assert entry.probe == ProbeSpec("udp", 7300, "/health")
        assert entry.weight == 1
        assert entry.addr6 is None


def test_unknown_fields_are_ignored_at_every_level() -> None:
    body = answer(
        ap(1, region="sh", probe={"kind": "udp", "port": 7300, "dscp": 46}, extra={"x": [1]}),
        ttl=60,
        version=3,
        motd="hello",
    )
    assert parse_answer(body) == parse_answer(answer(ap(1), ttl=60))


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ({}, ProbeSpec("udp", 7300, "/health")),
        ({"kind": "tcp"}, ProbeSpec("tcp", 7301, "/health")),
        ({"kind": "http", "path": "/h?x=1"}, ProbeSpec("http", 7301, "/h?x=1")),
        ({"kind": "udp", "port": 1}, ProbeSpec("udp", 1, "/health")),
        ({"kind": "tcp", "port": 65535}, ProbeSpec("tcp", 65535, "/health")),
        # icmp has no port: whatever the CC sends there is ignored
        ({"kind": "icmp", "port": 99999}, ProbeSpec("icmp", 0, "/health")),
        ({"kind": "icmp", "port": "x"}, ProbeSpec("icmp", 0, "/health")),
    ],
)
def test_probe_defaults_per_kind(probe: dict[str, Any], expected: ProbeSpec) -> None:
    assert parse_answer(answer(ap(1, probe=probe))).aps[0].probe == expected


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (60, 60.0),
        (30.5, 30.5),
        (0, MIN_TTL),
        (-5, MIN_TTL),
        (9.99, MIN_TTL),
        (10**12, MAX_TTL),
        (86400, MAX_TTL),
    ],
)
def test_ttl_is_clamped(ttl: float, expected: float) -> None:
    assert parse_answer(answer(ap(1), ttl=ttl)).ttl == expected


def test_ttl_overflowing_to_infinity_is_clamped() -> None:
    assert parse_answer(b'{"aps": [{"id": "a", "addr": "10.0.0.1"}], "ttl": 1e400}').ttl == MAX_TTL


def test_limits_are_inclusive() -> None:
    aps = [ap(i, addr=str(ipaddress.IPv4Address("10.1.0.1") + i)) for i in range(MAX_APS)]
    aps[0]["id"] = "x" * 64
    aps[0]["weight"] = 1000
    aps[0]["probe"] = {"kind": "http", "path": "/" + "p" * 255}
    d = parse_answer(answer(*aps))
    assert len(d.aps) == MAX_APS
    assert d.aps[0].weight == 1000


def test_order_is_kept_and_equal_answers_are_equal() -> None:
    body = answer(ap(3), ap(1), ap(2))
    assert [a.id for a in parse_answer(body).aps] == ["ap-3", "ap-1", "ap-2"]
    assert parse_answer(body) == parse_answer(body)


# --- parse_answer: rejections -----------------------------------------------------------------

TOO_MANY = [ap(i, addr=str(ipaddress.IPv4Address("10.1.0.1") + i)) for i in range(MAX_APS + 1)]

REJECTIONS: list[tuple[str, bytes, list[str]]] = [
    # (case, body, substrings the message must contain)
    ("html", b"<html>502 Bad Gateway</html>", ["not JSON", "<html>502"]),
    ("empty body", b"", ["not JSON"]),
    ("not utf-8", b"\xff\xfe\xfd{", ["not JSON"]),
    ("NaN", b'{"aps": [], "ttl": NaN}', ["not JSON", "NaN"]),
    ("deep nesting", b"[" * 200_000, ["nested too deeply"]),
    ("list", b"[1, 2]", ["not a JSON object", "a list"]),
    ("string", b'"aps"', ["not a JSON object", "a string"]),
    ("aps missing", b'{"ttl": 60}', ["aps: missing"]),
    ("aps null", b'{"aps": null}', ["aps: missing"]),
    ("aps object", b'{"aps": {"id": "a"}}', ["aps: expected a list, got an object"]),
    ("aps string", b'{"aps": "10.0.0.1"}', ["aps: expected a list, got a string"]),
    ("aps empty", answer(), ["aps: empty"]),
    ("too many", answer(*TOO_MANY), ["aps: 257 APs", "256"]),
    ("ap not object", answer(ap(1), "10.0.0.2"), ["aps[1]: expected an object, got a string"]),  # type: ignore[arg-type]
    ("id missing", answer(ap(1, id=DROP)), ["aps[0].id: missing"]),
    ("id number", answer(ap(1, id=7)), ["aps[0].id: expected a string, got a number"]),
    ("id empty", answer(ap(1, id="")), ["aps[0].id: empty"]),
    ("id long", answer(ap(1, id="x" * 65)), ["aps[0].id:", "longer than 64"]),
    ("id newline", answer(ap(1, id="a\nb")), ["aps[0].id: 'a\\nb'", "non-printable"]),
    ("id bidi", answer(ap(1, id="ap\u202e1")), ["aps[0].id:", "non-printable"]),
    ("id spaces", answer(ap(1, id=" ap")), ["aps[0].id:", "surrounding spaces"]),
    ("id dup", answer(ap(1, id="a"), ap(2, id="a")), ["aps[1].id: 'a' is also the id of aps[0]"]),
    ("no address", answer(ap(1, addr=DROP)), ["aps[0]: has neither addr", "addr6"]),
    ("null addresses", answer(ap(1, addr=None, addr6=None)), ["aps[0]: has neither addr"]),
    ("addr number", answer(ap(1, addr=167772161)), ["aps[0].addr: expected", "got a number"]),
    ("addr junk", answer(ap(1, addr="ten.0.0.1")), ["aps[0].addr: 'ten.0.0.1' is not an IP"]),
    ("addr cidr", answer(ap(1, addr="10.0.0.0/8")), ["aps[0].addr: '10.0.0.0/8' is not an IP"]),
    ("v6 in addr", answer(ap(1, addr="fd00::11")), ["aps[0].addr: 'fd00::11' is IPv6", "addr6"]),
    ("v4 in addr6", answer(ap(1, addr6="10.0.0.2")), ["aps[0].addr6: '10.0.0.2' is IPv4"]),
    ("loopback4", answer(ap(1, addr="127.0.0.1")), ["aps[0].addr: '127.0.0.1' is loopback"]),
    ("loopback6", answer(ap(1, addr6="::1")), ["aps[0].addr6: '::1' is loopback"]),
    ("multicast4", answer(ap(1, addr="224.0.0.1")), ["aps[0].addr: '224.0.0.1' is multicast"]),
    ("multicast6", answer(ap(1, addr6="ff02::1")), ["aps[0].addr6: 'ff02::1' is multicast"]),
    ("unspec4", answer(ap(1, addr="0.0.0.0")), ["aps[0].addr: '0.0.0.0' is unspecified"]),
    ("unspec6", answer(ap(1, addr6="::")), ["aps[0].addr6: '::' is unspecified"]),
    ("linklocal4", answer(ap(1, addr="169.254.0.9")), ["aps[0].addr: '169.254.0.9' is link-local"]),
    ("linklocal6", answer(ap(1, addr6="fe80::1")), ["aps[0].addr6: 'fe80::1' is link-local"]),
    ("broadcast", answer(ap(1, addr="255.255.255.255")), ["aps[0].addr:", "broadcast"]),
    ("reserved4", answer(ap(1, addr="240.0.0.1")), ["aps[0].addr: '240.0.0.1' is reserved"]),
    ("this network", answer(ap(1, addr="0.1.2.3")), ["aps[0].addr: '0.1.2.3'", "0.0.0.0/8"]),
    ("site-local", answer(ap(1, addr6="fec0::1")), ["aps[0].addr6: 'fec0::1' is site-local"]),
    (
        "mapped",
        answer(ap(1, addr6="::ffff:10.0.0.9")),
        ["aps[0].addr6:", "IPv4-mapped", "10.0.0.9"],
    ),
    ("zone", answer(ap(1, addr6="fd00::1%eth0")), ["aps[0].addr6: 'fd00::1%eth0'", "zone"]),
    (
        "dup addr",
        answer(ap(1, addr="10.0.0.5"), ap(2, addr="10.0.0.5")),
        ["aps[1].addr: '10.0.0.5' is also aps[0].addr"],
    ),
    (
        "dup addr6 spelled differently",
        answer(ap(1, addr6="fd00::11"), ap(2, addr6="FD00:0:0::11")),
        ["aps[1].addr6: 'FD00:0:0::11' is also aps[0].addr6"],
    ),
    ("probe list", answer(ap(1, probe=["udp"])), ["aps[0].probe: expected an object, got a list"]),
    ("probe kind", answer(ap(1, probe={"kind": "smtp"})), ["aps[0].probe.kind: 'smtp'", "udp"]),
    ("probe kind num", answer(ap(1, probe={"kind": 1})), ["aps[0].probe.kind: 1 is not one of"]),
    ("port 0", answer(ap(1, probe={"port": 0})), ["aps[0].probe.port: 0 is outside 1..65535"]),
    ("port big", answer(ap(1, probe={"port": 65536})), ["aps[0].probe.port: 65536 is outside"]),
    ("port str", answer(ap(1, probe={"port": "7300"})), ["aps[0].probe.port: expected an integer"]),
    ("port bool", answer(ap(1, probe={"port": True})), ["aps[0].probe.port: expected an integer"]),
    ("port float", answer(ap(1, probe={"port": 7300.5})), ["aps[0].probe.port: expected an int"]),
    ("path rel", answer(ap(1, probe={"path": "health"})), ["aps[0].probe.path: 'health'", "'/'"]),
    ("path num", answer(ap(1, probe={"path": 1})), ["aps[0].probe.path: expected a string"]),
    (
        "path long",
        answer(ap(1, probe={"path": "/" + "p" * 256})),
        ["probe.path:", "longer than 256"],
    ),
    ("path space", answer(ap(1, probe={"path": "/a b"})), ["aps[0].probe.path: '/a b'", "ASCII"]),
    ("path crlf", answer(ap(1, probe={"path": "/a\r\nX: y"})), ["aps[0].probe.path:", "ASCII"]),
    ("weight 0", answer(ap(1, weight=0)), ["aps[0].weight: 0 is outside 1..1000"]),
    ("weight big", answer(ap(1, weight=1001)), ["aps[0].weight: 1001 is outside 1..1000"]),
    ("weight str", answer(ap(1, weight="1")), ["aps[0].weight: expected an integer, got a str"]),
    ("weight bool", answer(ap(1, weight=True)), ["aps[0].weight: expected an integer, got a bool"]),
    ("weight float", answer(ap(1, weight=1.5)), ["aps[0].weight: expected an integer, got a num"]),
    ("ttl str", answer(ap(1), ttl="60"), ["ttl: expected a number of seconds, got a string"]),
    ("ttl bool", answer(ap(1), ttl=True), ["ttl: expected a number of seconds, got a boolean"]),
    ("ttl list", answer(ap(1), ttl=[60]), ["ttl: expected a number of seconds, got a list"]),
    # the first problem is reported, in list order
    ("third ap", answer(ap(1), ap(2), ap(3, addr="127.0.0.9")), ["aps[2].addr: '127.0.0.9'"]),
]


@pytest.mark.parametrize(
    ("body", "expected"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejection_names_the_field_and_the_problem(body: bytes, expected: list[str]) -> None:
    message = bad(body)
    for part in expected:
        assert part in message
    assert len(message) < 400, message


def test_rejection_never_quotes_a_huge_body_or_value() -> None:
    assert len(bad(b"x" * (1 << 20))) < 300
    assert len(bad(answer(ap(1, addr="1" * 100_000)))) < 300
    assert len(bad(answer(ap(1, id="\n" * 100_000)))) < 300


def test_rejection_escapes_control_characters() -> None:
    message = bad(b"\x1b[31mred\x1b[0m")
    assert "\x1b" not in message and "\\x1b" in message


# --- CCClient ---------------------------------------------------------------------------------

GOOD = answer(ap(1, addr6="fd00::11"), ap(2), ttl=30)

Handler = Callable[[httpx.Request], Any]


def client(handler: Handler, url: str = CC, **kw: Any) -> CCClient:
    return CCClient(url, transport=httpx.MockTransport(handler), **kw)


def fetch(handler: Handler, url: str = CC, **kw: Any) -> Directory:
    async def main() -> Directory:
        async with client(handler, url, **kw) as cc:
            result: Directory = await cc.fetch()
            return result

    return run(main)  # type: ignore[no-any-return]


def fetch_error(handler: Handler, error: type[Exception] = DiscoveryError, **kw: Any) -> Exception:
    with pytest.raises(error) as info:
        fetch(handler, **kw)
    return info.value


class Chunks(httpx.AsyncByteStream):
    """A streamed body that counts how many chunks were pulled from it.

    A class-based iterator, not an async generator: trio would warn about the test's own
    generator being dropped unexhausted when the client stops reading.
    """

    def __init__(self, chunk: bytes, count: int) -> None:
        self.chunk, self.count = chunk, count
        self.sent = 0
        self.closed = False

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self.sent >= self.count:
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        self.sent += 1
        return self.chunk

    async def aclose(self) -> None:
        self.closed = True


def test_fetch_returns_the_directory() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=GOOD)

    assert fetch(handler) == parse_answer(GOOD)
    (request,) = seen
    assert request.method == "GET"
    assert str(request.url) == "https://cc.example:8443/v1/aps"
    assert request.headers["accept"] == "application/json"
    assert "authorization" not in request.headers


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("https://cc.example:8443", "https://cc.example:8443/v1/aps"),
        ("https://cc.example:8443/", "https://cc.example:8443/v1/aps"),
        ("https://cc.example:8443//", "https://cc.example:8443/v1/aps"),
        ("https://gw.example/sdn", "https://gw.example/sdn/v1/aps"),
        ("https://gw.example/sdn/", "https://gw.example/sdn/v1/aps"),
        ("http://[fd00::1]:8080", "http://[fd00::1]:8080/v1/aps"),
    ],
)
def test_url_join(base: str, expected: str) -> None:
    urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        return httpx.Response(200, content=GOOD)

    fetch(handler, base)
    assert urls == [expected]
    assert client(handler, base).url == expected.removesuffix("/v1/aps")


def test_bearer_token_is_sent() -> None:
    auth: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        auth.append(request.headers["authorization"])
        return httpx.Response(200, content=GOOD)

    fetch(handler, token=f"{SECRET}\n")  # as read from a file: the newline is stripped
    assert auth == [f"Bearer {SECRET}"]


def test_http_status_is_a_discovery_error_with_the_status() -> None:
    err = fetch_error(lambda r: httpx.Response(500, content=b"db down"))
    assert type(err) is DiscoveryError
    assert "CC https://cc.example:8443 answered HTTP 500 Internal Server Error" in str(err)
    assert str(err).endswith("; body 'db down'")  # text, not a Python bytes literal
    err = fetch_error(lambda r: httpx.Response(502, content=b"bad \xff gateway\n"))
    assert str(err).endswith("; body 'bad \ufffd gateway'")


def test_http_status_body_is_truncated_or_not_read() -> None:
    err = fetch_error(lambda r: httpx.Response(503, content=b"\x00" * 4000))
    assert "HTTP 503" in str(err) and "\\x00" in str(err) and len(str(err)) < 600
    big = Chunks(b"x" * 4097, 1)
    headers = {"Content-Length": "4097"}
    err = fetch_error(lambda r: httpx.Response(503, headers=headers, stream=big))
    assert str(err) == "CC https://cc.example:8443 answered HTTP 503 Service Unavailable"
    assert big.sent == 0


@pytest.mark.parametrize(
    ("status", "token", "expected"),
    [
        (401, None, "wants a token and none was given"),
        (403, SECRET, "refused the token"),
        (204, None, "HTTP 204"),
    ],
)
def test_http_status_hints(status: int, token: str | None, expected: str) -> None:
    assert expected in str(fetch_error(lambda r: httpx.Response(status), token=token))


def test_redirects_are_not_followed() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url)
        return httpx.Response(302, headers={"Location": "https://evil.example/v1/aps"})

    err = fetch_error(handler, token=SECRET)
    assert "HTTP 302" in str(err) and "not followed" in str(err) and "evil.example" in str(err)
    assert len(calls) == 1


def test_garbage_is_a_bad_answer() -> None:
    err = fetch_error(lambda r: httpx.Response(200, content=b"<html>oops"), BadAnswerError)
    assert str(err).startswith("CC https://cc.example:8443 sent a bad AP list: answer is not JSON")


def test_invalid_ap_list_is_a_bad_answer_naming_the_field() -> None:
    body = answer(ap(1), ap(2, addr="224.0.0.5"))
    err = fetch_error(lambda r: httpx.Response(200, content=body), BadAnswerError)
    assert "aps[1].addr: '224.0.0.5' is multicast" in str(err)


# Stopping early leaves httpx 0.28's inner async generators unexhausted; trio closes them with a
# ResourceWarning (encode/httpx#3686), which the project's filterwarnings=error would turn fatal.
@pytest.mark.filterwarnings("ignore:Async generator 'httpx.:ResourceWarning")
def test_oversize_stream_is_refused_without_reading_it_all() -> None:
    body = Chunks(b" " * (64 << 10), 32)  # 2 MiB, no Content-Length
    err = fetch_error(lambda r: httpx.Response(200, stream=body), BadAnswerError)
    assert "answer larger than 1 MiB" in str(err)
    assert body.sent == 17  # 16 chunks fill 1 MiB; the 17th crosses it
    assert body.closed


def test_oversize_content_length_is_refused_before_reading() -> None:
    body = Chunks(b" " * (64 << 10), 32)
    headers = {"Content-Length": str(2 << 20)}
    err = fetch_error(lambda r: httpx.Response(200, headers=headers, stream=body), BadAnswerError)
    assert "answer larger than 1 MiB" in str(err) and "Content-Length 2097152" in str(err)
    assert body.sent == 0


def test_answer_of_exactly_max_bytes_is_read() -> None:
    padded = GOOD + b" " * (1000 - len(GOOD))
    assert fetch(lambda r: httpx.Response(200, content=padded), max_bytes=1000).ttl == 30
    err = fetch_error(
        lambda r: httpx.Response(200, content=padded + b" "), BadAnswerError, max_bytes=1000
    )
    assert "larger than 1000 bytes" in str(err)


def test_slow_answer_times_out() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(10)
        return httpx.Response(200, content=GOOD)

    async def main() -> None:
        async with client(handler) as cc:
            with pytest.raises(DiscoveryError, match=r"did not answer within 8 s"):
                await cc.fetch()
        assert trio.current_time() == pytest.approx(8.0)  # connect 3 s + read 5 s

    run(main)


def test_slow_body_times_out_too() -> None:
    class Trickle(Chunks):
        async def __anext__(self) -> bytes:
            await trio.sleep(1)  # each byte comes well within the read timeout
            return b" "

    err = fetch_error(lambda r: httpx.Response(200, stream=Trickle(b"", 0)))
    assert "did not answer within 8 s" in str(err)


def connect_error(request: httpx.Request, cause: BaseException) -> httpx.ConnectError:
    error = httpx.ConnectError("", request=request)
    error.__cause__ = cause
    return error


def refused(request: httpx.Request) -> httpx.Response:
    # what httpcore's trio backend raises: the errno hides in an exception group
    group = ExceptionGroup("all attempts failed", [ConnectionRefusedError(111, "refused")])
    error = OSError("all attempts to connect to cc.example:8443 failed")
    error.__cause__ = group
    raise connect_error(request, error)


def raising(cause: BaseException) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise connect_error(request, cause)

    return handler


def cert_error() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify")
    error.verify_message = "self-signed certificate"
    return error


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (refused, "CC https://cc.example:8443 refused the connection"),
        (
            raising(socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            "cannot resolve 'cc.example': Name or service not known",
        ),
        (
            raising(OSError(errno.ENETUNREACH, "Network is unreachable")),
            "CC https://cc.example:8443 is unreachable: Network is unreachable",
        ),
        (raising(cert_error()), "TLS certificate is not trusted: self-signed certificate"),
        (raising(ssl.SSLError(1, "wrong version number")), "TLS handshake failed"),
        (raising(RuntimeError("strange")), "CC https://cc.example:8443: cannot connect"),
    ],
)
def test_connect_errors_name_the_cause(handler: Handler, expected: str) -> None:
    err = fetch_error(handler)
    assert type(err) is DiscoveryError
    assert expected in str(err)
    assert isinstance(err.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ConnectTimeout(""), "did not accept a connection within 3 s"),
        (httpx.ReadTimeout(""), "did not answer within 5 s"),
        (httpx.PoolTimeout(""), "timed out (PoolTimeout)"),
        (httpx.ReadError("connection reset"), "the exchange failed: ReadError: connection reset"),
        (httpx.RemoteProtocolError("illegal header"), "broke the HTTP protocol: illegal header"),
        (ConnectionResetError(104, "reset"), "reset"),
    ],
)
def test_transport_errors_are_mapped(error: Exception, expected: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    err = fetch_error(handler)
    assert type(err) is DiscoveryError and expected in str(err)
    assert err.__cause__ is error


def test_undecodable_body_is_a_bad_answer() -> None:
    headers = {"Content-Encoding": "gzip"}
    err = fetch_error(
        lambda r: httpx.Response(200, headers=headers, content=b"not gzip"), BadAnswerError
    )
    assert "cannot be decoded" in str(err)


def test_cancellation_from_outside_is_not_turned_into_an_error() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    async def main() -> None:
        async with client(handler) as cc:
            with trio.move_on_after(1) as scope:
                await cc.fetch()
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(1.0)

    run(main)


def test_token_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def texts(err: BaseException) -> str:
        return "".join(traceback.format_exception(err))

    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(100)
        raise AssertionError

    handlers: list[Handler] = [
        lambda r: httpx.Response(500, content=r.headers["authorization"].encode()[:0] + b"no"),
        lambda r: httpx.Response(401),
        lambda r: httpx.Response(200, content=b"garbage"),
        lambda r: httpx.Response(200, content=b" " * ((1 << 20) + 1)),
        lambda r: httpx.Response(302, headers={"Location": "/elsewhere"}),
        refused,
        raising(cert_error()),
        slow,
    ]
    errors: list[BaseException] = []
    for handler in handlers:
        cc = client(handler, token=SECRET)
        assert SECRET not in repr(cc) and SECRET not in str(cc)
        assert "token=<set>" in repr(cc)

        async def main(cc: CCClient = cc) -> None:
            async with cc:
                try:
                    await cc.fetch()
                except DiscoveryError as exc:
                    errors.append(exc)

        run(main)
    assert len(errors) == len(handlers)
    for err in errors:
        assert SECRET not in texts(err)
    assert caplog.records  # httpx logged its requests
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    # a token that cannot be sent is refused without being shown
    with pytest.raises(ConfigError) as info:
        CCClient(CC, token=f"{SECRET}\r\nX-Evil: 1")
    assert SECRET not in texts(info.value)


def test_plain_http_with_a_token_warns_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    CCClient("http://cc.example", token=SECRET)
    assert "clear text" in caplog.text and SECRET not in caplog.text


@pytest.mark.parametrize(
    ("url", "token", "expected"),
    [
        ("ftp://cc.example", None, "expected https://HOST"),
        ("cc.example:8443", None, "expected https://HOST"),
        ("https://", None, "CC URL"),
        ("https://cc.example/?x=1", None, "query or fragment"),
        ("https://admin:hunter2@cc.example", None, "credentials do not go in the URL"),
        (CC, "", "token is empty"),
        (CC, "  \n", "token is empty"),
        (CC, "tök", "visible ASCII"),
        (CC, "a b", "visible ASCII"),
    ],
)
def test_bad_configuration(url: str, token: str | None, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        CCClient(url, token=token)
    assert expected in str(info.value)
    assert "hunter2" not in str(info.value)


def test_ca_file(tmp_path: Path) -> None:
    CCClient(CC, ca_file=Path(certifi.where()))  # a readable PEM bundle: fine
    with pytest.raises(ConfigError, match=r"CC CA file .*missing\.pem"):
        CCClient(CC, ca_file=tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"CC CA file .*junk\.pem"):
        CCClient(CC, ca_file=junk)


def test_aclose_is_idempotent_and_final() -> None:
    async def main() -> None:
        cc = client(lambda r: httpx.Response(200, content=GOOD))
        await cc.aclose()  # never used: nothing to close
        cc = client(lambda r: httpx.Response(200, content=GOOD))
        assert (await cc.fetch()).ttl == 30  # the httpx client is built on first use
        await cc.aclose()
        await cc.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await cc.fetch()

    run(main)


# --- discover ---------------------------------------------------------------------------------


class FlakyCC:
    """A CC (behind a real CCClient and MockTransport) that fails ``failures`` times first."""

    def __init__(self, failures: float, bad_answer: bool = False) -> None:
        self.failures = failures
        self.bad_answer = bad_answer
        self.calls = 0
        self.retries: list[tuple[int, DiscoveryError, float, float]] = []
        self.client = client(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls > self.failures:
            return httpx.Response(200, content=GOOD)
        if self.bad_answer:
            return httpx.Response(200, content=f"garbage {self.calls}".encode())
        return httpx.Response(503, content=f"failure {self.calls}".encode())

    def on_retry(self, attempt: int, error: DiscoveryError, delay: float) -> None:
        self.retries.append((attempt, error, delay, trio.current_time()))

    @property
    def delays(self) -> list[float]:
        return [r[2] for r in self.retries]


def test_backoff_ceiling() -> None:
    assert [backoff_ceiling(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_ceiling(0) == 1
    assert backoff_ceiling(10_000) == BACKOFF_CAP  # no float overflow after days of retries


def test_discover_returns_after_two_failures() -> None:
    cc = FlakyCC(failures=2)

    async def main() -> None:
        directory = await discover(cc.client, on_retry=cc.on_retry)
        assert directory == parse_answer(GOOD)
        assert trio.current_time() == pytest.approx(sum(cc.delays))

    run(main)
    assert cc.calls == 3
    assert [r[0] for r in cc.retries] == [1, 2]
    for attempt, error, delay, _ in cc.retries:
        assert 0.0 <= delay <= backoff_ceiling(attempt)  # full jitter: [0, min(cap, 2**(n-1))]
        assert f"failure {attempt}" in str(error)


def test_discover_gives_up_with_the_last_error() -> None:
    cc = FlakyCC(failures=float("inf"))

    async def main() -> None:
        with pytest.raises(DiscoveryError) as info:
            await discover(cc.client, retries=2, on_retry=cc.on_retry)
        err = info.value
        assert type(err) is DiscoveryError
        assert str(err).startswith("gave up after 3 attempts: CC https://cc.example:8443")
        assert "HTTP 503" in str(err) and "failure 3" in str(err)
        assert isinstance(err.__cause__, DiscoveryError) and "failure 3" in str(err.__cause__)

    run(main)
    assert cc.calls == 3
    assert [r[0] for r in cc.retries] == [1, 2]


def test_bad_answers_are_retried_and_keep_their_class() -> None:
    cc = FlakyCC(failures=float("inf"), bad_answer=True)

    async def main() -> None:
        with pytest.raises(BadAnswerError, match=r"gave up after 2 attempts: .*garbage 2"):
            await discover(cc.client, retries=1, on_retry=cc.on_retry)

    run(main)
    assert cc.calls == 2


def test_retries_zero_is_one_attempt() -> None:
    cc = FlakyCC(failures=float("inf"))

    async def main() -> None:
        with pytest.raises(DiscoveryError, match=r"^gave up after 1 attempt: "):
            await discover(cc.client, retries=0, on_retry=cc.on_retry)

    run(main)
    assert cc.calls == 1 and cc.retries == []


def test_total_sleep_is_bounded_by_the_caps() -> None:
    cc = FlakyCC(failures=float("inf"))
    retries = 12

    async def main() -> None:
        with pytest.raises(DiscoveryError):
            await discover(cc.client, retries=retries, on_retry=cc.on_retry)
        bound = sum(backoff_ceiling(n) for n in range(1, retries + 1))  # 1+2+...+32+6*60 = 423
        assert bound == 423
        assert trio.current_time() == pytest.approx(sum(cc.delays))
        assert trio.current_time() <= bound

    run(main)
    assert cc.calls == retries + 1
    assert all(0 <= d <= min(BACKOFF_CAP, 2 ** (n - 1)) for n, _, d, _ in cc.retries)
    # jittered, not in step: the capped delays are spread over [0, 60]
    assert len({round(d, 6) for d in cc.delays}) == retries


def test_unlimited_retries_by_default_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    cc = FlakyCC(failures=40)

    async def main() -> None:
        await discover(cc.client)
        assert trio.current_time() <= sum(backoff_ceiling(n) for n in range(1, 41))

    run(main)
    assert cc.calls == 41
    lines = [r.getMessage() for r in caplog.records if r.name == "sdnsup.discovery"]
    assert len(lines) == 40
    assert lines[0].startswith("CC attempt 1 failed: CC https://cc.example:8443 answered HTTP 503")


def test_cancel_during_the_sleep_propagates_promptly() -> None:
    cc = FlakyCC(failures=float("inf"))

    async def main() -> None:
        with trio.CancelScope() as scope:

            def cancel(attempt: int, error: DiscoveryError, delay: float) -> None:
                cc.on_retry(attempt, error, delay)
                scope.cancel()  # delivered at the next checkpoint: the backoff sleep

            await discover(cc.client, on_retry=cancel)
        assert scope.cancelled_caught
        assert trio.current_time() == 0.0  # did not sleep the backoff

    run(main)
    assert cc.calls == 1 and len(cc.retries) == 1


def test_deadline_around_unlimited_discovery() -> None:
    cc = FlakyCC(failures=float("inf"))

    async def main() -> None:
        with trio.move_on_after(1000) as scope:
            await discover(cc.client, on_retry=cc.on_retry)
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(1000)

    run(main)
    assert cc.calls >= 1000 / BACKOFF_CAP


def test_cancel_during_an_attempt_is_not_retried() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()
        raise AssertionError

    retried: list[int] = []

    async def main() -> None:
        with trio.move_on_after(2) as scope:
            await discover(client(handler), on_retry=lambda a, e, d: retried.append(a))
        assert scope.cancelled_caught

    run(main)
    assert calls == 1 and retried == []


def test_other_errors_are_not_retried() -> None:
    class Broken:
        calls = 0

        async def fetch(self) -> Directory:
            self.calls += 1
            raise KeyError("bug")

    broken = Broken()

    async def main() -> None:
        with pytest.raises(KeyError):
            await discover(broken)

    run(main)
    assert broken.calls == 1


def test_negative_retries_is_a_programming_error() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="retries"):
            await discover(FlakyCC(0).client, retries=-1)

    run(main)


# --- the CC saying "back off" ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "header", "overloaded", "retry_after"),
    [
        (429, "30", True, 30.0),
        (503, None, True, None),
        (503, "86400", True, 600.0),  # cut to RETRY_AFTER_MAX
        (500, "5", False, 5.0),
        (429, "soon", True, None),  # unreadable: ignored
    ],
)
def test_overload_and_retry_after_are_reported(
    status: int, header: str | None, overloaded: bool, retry_after: float | None
) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    err = fetch_error(lambda r: httpx.Response(status, headers=headers))
    assert isinstance(err, DiscoveryError)
    assert (err.overloaded, err.retry_after) == (overloaded, retry_after)
    if retry_after is not None:
        assert f"it asks to retry after {retry_after:g} s" in str(err)


def test_retry_after_as_an_http_date() -> None:
    now = 1_764_645_000.0
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(90.0)
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None


def test_discover_waits_at_least_what_retry_after_asks() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "40"})
        return httpx.Response(200, content=GOOD)

    async def main() -> None:
        async with client(handler) as cc:
            await discover(cc, on_retry=lambda *_: None)

    run(main)
    assert len(calls) == 2 and 40.0 <= calls[1] - calls[0] <= 48.0
