"""Property tests: no CC answer crashes discovery or yields an invalid AP.

Whatever bytes or JSON the CC sends, :func:`sdnsup.discovery.parse_answer` returns a
:class:`~sdnsup.discovery.Directory` whose every AP meets the documented rules, or raises
:class:`~sdnsup.errors.BadAnswerError`; through :class:`~sdnsup.discovery.CCClient` (on
``httpx.MockTransport``, every sleep on trio's MockClock) the outcome is the parser's, or a
:class:`~sdnsup.errors.DiscoveryError` when the exchange itself fails. A Directory also says
exactly what the CC said: same APs in the same order, addresses, probe, weight and ttl.

Most generated answers are *almost* valid (each field good or arbitrary JSON), so that many
examples get past the first check and the rules deep inside an AP are exercised too.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sdnsup.aps import DEFAULT_PROBE_PORT, PROBE_KINDS
from sdnsup.discovery import (
    DEFAULT_TTL,
    MAX_APS,
    MAX_ID_LEN,
    MAX_PATH_LEN,
    MAX_TTL,
    MAX_WEIGHT,
    MIN_TTL,
    CCClient,
    Directory,
    parse_answer,
)
from sdnsup.errors import BadAnswerError, DiscoveryError
from tests.test_discovery import CC, run  # the MockClock runner the client tests use

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address


# Answers are built from several nested strategies; big ones are the point.
def prop_settings(max_examples: int) -> settings:
    """The shared profile (see the root conftest.py) with this file's example count."""
    return settings(
        max_examples=max_examples,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- what a valid Directory is (the module docstring's rules) ----------------------------------


def unicast_problem(addr: IPv4Address | IPv6Address) -> str | None:
    """Why no AP may have ``addr``, by the rules of the module docstring."""
    checks = [
        (addr.is_loopback, "loopback"),
        (addr.is_multicast, "multicast"),
        (addr.is_unspecified, "unspecified"),
        (addr.is_link_local, "link-local"),
        (addr.is_reserved, "reserved"),
    ]
    if isinstance(addr, IPv4Address):
        checks += [
            (addr == IPv4Address("255.255.255.255"), "broadcast"),
            (addr in ipaddress.IPv4Network("0.0.0.0/8"), "this network"),
        ]
    else:
        checks += [
            (addr.is_site_local, "site-local"),
            (addr.ipv4_mapped is not None, "IPv4-mapped"),
            (addr.scope_id is not None, "scoped"),
        ]
    return next((why for bad, why in checks if bad), None)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_directory(d: Directory) -> None:
    """Every invariant a consumer of a Directory (prober, applier, status) relies on."""
    assert isinstance(d, Directory)
    assert 1 <= len(d.aps) <= MAX_APS
    assert isinstance(d.ttl, float) and MIN_TTL <= d.ttl <= MAX_TTL
    ids = [ap.id for ap in d.aps]
    assert len(set(ids)) == len(ids), "two APs share an id"
    addrs = [a for ap in d.aps for a in (ap.addr4, ap.addr6) if a is not None]
    assert len(set(addrs)) == len(addrs), "two APs share an address"
    for ap in d.aps:
        assert isinstance(ap.id, str) and 1 <= len(ap.id) <= MAX_ID_LEN
        assert ap.id.isprintable() and ap.id.strip() == ap.id
        assert ap.addr4 is None or type(ap.addr4) is IPv4Address
        assert ap.addr6 is None or type(ap.addr6) is IPv6Address
        assert ap.addr4 is not None or ap.addr6 is not None
        for a in (ap.addr4, ap.addr6):
            if a is not None:
                assert unicast_problem(a) is None, f"{ap.id}: {a} is {unicast_problem(a)}"
        assert ap.probe.kind in PROBE_KINDS
        if ap.probe.kind != "icmp":  # icmp has no port
            assert _is_int(ap.probe.port) and 1 <= ap.probe.port <= 65535
        path = ap.probe.path
        assert isinstance(path, str) and path.startswith("/") and len(path) <= MAX_PATH_LEN
        assert all("!" <= c <= "~" for c in path)
        assert _is_int(ap.weight) and 1 <= ap.weight <= MAX_WEIGHT


def check_faithful(doc: Any, d: Directory) -> None:
    """A Directory says what the CC said: every AP, in order, with its own values."""
    items = doc["aps"]
    assert len(d.aps) == len(items)
    for ap, item in zip(d.aps, items, strict=True):
        assert ap.id == item["id"]
        for key, got in (("addr", ap.addr4), ("addr6", ap.addr6)):
            sent = item.get(key)
            assert got == (None if sent is None else ipaddress.ip_address(sent))
        assert ap.weight == (1 if item.get("weight") is None else item["weight"])
        probe = item.get("probe") or {}
        kind = probe.get("kind") or "udp"
        assert ap.probe.kind == kind
        port = probe.get("port")
        want_port = DEFAULT_PROBE_PORT[kind] if port is None or kind == "icmp" else port
        assert ap.probe.port == want_port
        assert ap.probe.path == (probe.get("path") or "/health")
    ttl = doc.get("ttl")
    # Clamped before any conversion: an integer too large for a float is still a ttl.
    assert d.ttl == (DEFAULT_TTL if ttl is None else float(min(max(ttl, MIN_TTL), MAX_TTL)))


# --- answers -----------------------------------------------------------------------------------

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities too: json.dumps writes them, the parser must refuse
    st.text(max_size=12),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, else any JSON value."""
    return st.one_of(good, good, good, json_values)


# Addresses a CC might send by mistake, each breaking one rule; and a few good ones, reused so
# that two APs sharing an address is common.
ODD_ADDRS = [
    "127.0.0.1", "0.0.0.0", "0.1.2.3", "255.255.255.255", "224.0.0.1", "169.254.1.1",
    "240.0.0.1", "::", "::1", "ff02::1", "fe80::1", "fec0::1", "::ffff:10.0.0.1",
    "fd00::1%eth0", "10.0.0.1/32", " 10.0.0.1", "10.0.0.01", "::10.0.0.1",
]  # fmt: skip
GOOD4 = ["10.77.0.11", "10.77.0.12", "192.0.2.1"]
GOOD6 = ["fd77::11", "fd77::12", "2001:db8::1"]
addr4_texts = st.one_of(
    st.sampled_from(GOOD4),
    st.ip_addresses(v=4).map(str),
    st.sampled_from(ODD_ADDRS),
    st.ip_addresses(v=6).map(str),  # the wrong family
)
addr6_texts = st.one_of(
    st.sampled_from(GOOD6),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(ODD_ADDRS),
    st.ip_addresses(v=4).map(str),
)
ids = st.one_of(
    st.sampled_from(["ap-1", "ap-2", "ap-3"]),
    st.text(max_size=MAX_ID_LEN + 4),
    st.sampled_from(["", " ap", "ap\n", "x" * MAX_ID_LEN, "x" * (MAX_ID_LEN + 1), "ap\x00"]),
)
paths = st.one_of(
    st.sampled_from(["/health", "/h?x=1", "health", "/" + "p" * MAX_PATH_LEN, "/a b", "/é"]),
    st.text(max_size=12),
)
probes = st.fixed_dictionaries(
    {},
    optional={
        "kind": mostly(st.sampled_from([*PROBE_KINDS, "ICMP", "quic"])),
        "port": mostly(st.one_of(st.integers(-1, 70_000), st.sampled_from([0, 1, 65535, 65536]))),
        "path": mostly(paths),
        "dscp": json_values,
    },
)
noisy_aps = st.fixed_dictionaries(
    {"id": mostly(ids)},
    optional={
        "addr": mostly(addr4_texts),
        "addr6": mostly(addr6_texts),
        "probe": mostly(probes),
        "weight": mostly(st.integers(-1, MAX_WEIGHT + 1)),
        "region": json_values,
    },
)


def unicast(version: int) -> st.SearchStrategy[str]:
    return st.ip_addresses(v=version).filter(lambda a: unicast_problem(a) is None).map(str)


finite_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# APs that break no rule on their own (two of them may still clash), so that a good share of
# answers is accepted and what the Directory holds gets checked too.
clean_aps = st.fixed_dictionaries(
    {
        "id": st.text("abcdefghijklmnopqrstuvwxyz0123456789-._:é", min_size=1, max_size=8),
        "addr": st.one_of(st.sampled_from(GOOD4), unicast(4), unicast(4)),
    },
    optional={
        "addr6": st.one_of(st.sampled_from(GOOD6), unicast(6), unicast(6)),
        "probe": st.fixed_dictionaries(
            {"kind": st.sampled_from(PROBE_KINDS)},
            optional={
                "port": st.integers(1, 65535),
                "path": st.sampled_from(["/health", "/h?x=1", "/" + "p" * (MAX_PATH_LEN - 1)]),
            },
        ),
        "weight": st.integers(1, MAX_WEIGHT),
        "region": finite_json_values,
    },
)
ttls = st.one_of(
    st.integers(-10, 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, MIN_TTL, MAX_TTL, 10**30]),
)
noisy_answers = st.fixed_dictionaries(
    {"aps": mostly(st.lists(noisy_aps, max_size=5))},
    optional={"ttl": mostly(ttls), "version": json_values},
)
clean_answers = st.fixed_dictionaries(
    {"aps": st.lists(clean_aps, min_size=1, max_size=4, unique_by=lambda a: a["id"])},
    optional={"ttl": ttls, "version": finite_json_values},
)
answers = st.one_of(noisy_answers, clean_answers)
documents = st.one_of(noisy_answers, clean_answers, clean_answers, json_values)


@st.composite
def encoded(draw: st.DrawFn, docs: st.SearchStrategy[Any]) -> tuple[Any, bytes]:
    """A document and its bytes: JSON in UTF-8/16/32, as json.loads detects them."""
    doc = draw(docs)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return doc, text.encode(draw(st.sampled_from(["utf-8", "utf-16", "utf-32"])))


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """Valid-looking bytes with a few bytes overwritten, removed or inserted."""
    _, body = draw(encoded(answers))
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "del", "ins"]))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "del":
            del data[i]
        else:
            data.insert(i, draw(st.integers(0, 255)))
    return bytes(data)


def nested(depth: int) -> bytes:
    return b'{"aps": ' + b"[" * depth + b"]" * depth + b"}"


# What json.dumps never writes but a CC's JSON library might.
TRICKY = [
    b'{"aps": [{"id": "\\ud800", "addr": "10.0.0.1"}]}',  # a lone surrogate, escaped
    b'{"aps": [{"id": "a", "addr": "10.0.0.1"}], "aps": 1}',  # a repeated key: the last wins
    b'\xef\xbb\xbf{"aps": [{"id": "a", "addr": "10.0.0.1"}]}',  # a UTF-8 byte order mark
    b'{"aps": [{"id": "a", "addr": "10.0.0.1"}], "ttl": 1e400}',  # reads as infinity
    b'{"aps": [{"id": "a", "addr": "10.0.0.1"}], "ttl": -0.0}',
    b'{"aps": [{"id": "a", "addr": "10.0.0.1", "weight": 1.0}]}',
    b'{"aps": [{"id": "a", "addr": "10.0.0.1", "weight": ' + b"9" * 5000 + b"}]}",
    b'{"aps": [{"id": "a", "addr": "10.0.0.1"}]} trailing',
    b"\x00" * 8,
]
bodies = st.one_of(
    encoded(documents).map(lambda pair: pair[1]),
    encoded(documents).map(lambda pair: pair[1]),
    st.binary(max_size=64),
    st.sampled_from(TRICKY),
    damaged(),
    st.integers(1, 100_000).map(nested),
)


def outcome(body: bytes) -> Directory | BadAnswerError:
    """What parse_answer makes of ``body``: any other exception fails the test."""
    try:
        return parse_answer(body)
    except BadAnswerError as exc:
        return exc


# --- the parser --------------------------------------------------------------------------------


@prop_settings(150)
@given(encoded(documents))
def test_any_json_gives_a_valid_directory_or_bad_answer(pair: tuple[Any, bytes]) -> None:
    doc, body = pair
    result = outcome(body)
    event(f"outcome: {type(result).__name__}")  # --hypothesis-show-statistics
    if isinstance(result, Directory):
        check_directory(result)
        check_faithful(doc, result)


@prop_settings(100)
@given(bodies)
def test_any_bytes_give_a_valid_directory_or_bad_answer(body: bytes) -> None:
    result = outcome(body)
    if isinstance(result, Directory):
        check_directory(result)
    else:
        # The message is shown to an operator: bounded, and no raw control characters.
        message = str(result)
        assert len(message) < 1000
        assert not any(c in message for c in "\x00\x1b\r\n")


@prop_settings(30)
@given(st.integers(MAX_APS - 3, MAX_APS + 3))
def test_at_most_max_aps_are_accepted(n: int) -> None:
    aps = [{"id": f"ap-{i}", "addr": str(IPv4Address("10.1.0.1") + i)} for i in range(n)]
    result = outcome(json.dumps({"aps": aps}).encode())
    if n <= MAX_APS:
        assert isinstance(result, Directory) and len(result.aps) == n
    else:
        assert isinstance(result, BadAnswerError)


# --- through the CC client ---------------------------------------------------------------------


class Pieces(httpx.AsyncByteStream):
    """A body streamed in pieces without Content-Length, optionally stalling before one.

    A class, not an async generator: trio warns about a generator the client stops reading.
    """

    def __init__(self, pieces: list[bytes], stall_at: int | None) -> None:
        self.pieces = pieces
        self.stall_at = stall_at
        self.sent = 0

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> bytes:
        if self.sent >= len(self.pieces):
            raise StopAsyncIteration
        if self.sent == self.stall_at:
            await trio.sleep(3600)  # far past the client's deadline
        await trio.lowlevel.checkpoint()
        self.sent += 1
        return self.pieces[self.sent - 1]

    async def aclose(self) -> None:
        pass


def _transport_errors(request: httpx.Request | None) -> list[BaseException]:
    return [
        httpx.ConnectError("refused", request=request),
        httpx.ConnectTimeout("slow", request=request),
        httpx.ReadTimeout("slow", request=request),
        httpx.WriteTimeout("slow", request=request),
        httpx.PoolTimeout("busy", request=request),
        httpx.ReadError("reset", request=request),
        httpx.WriteError("broken pipe", request=request),
        httpx.RemoteProtocolError("garbage status line", request=request),
        httpx.ProxyError("no", request=request),
        ConnectionResetError(104, "Connection reset by peer"),
    ]


@st.composite
def exchanges(draw: st.DrawFn) -> dict[str, Any]:
    """How the CC (or the network) answers one request: half the time a complete 200 answer
    (so that the client's verdict can be compared with the parser's), else anything."""
    x = {
        "body": draw(bodies),
        "status": 200,
        "encoding": draw(st.sampled_from(["identity", "gzip", "deflate", "x-odd"])),
        "framing": draw(st.sampled_from(["length", "pieces"])),
        "piece": draw(st.integers(1, 64)),
        "stall": None,
        "fault": None,
        "slow": False,
        "max_bytes": 1 << 20,
    }
    if draw(st.booleans()):
        x |= {
            "status": draw(st.one_of(st.just(200), st.integers(100, 599))),
            "encoding": draw(st.sampled_from(["identity", "gzip", "bad-gzip", "x-odd"])),
            "framing": draw(st.sampled_from(["length", "pieces", "huge-length"])),
            "stall": draw(st.none() | st.integers(0, 3)),
            "fault": draw(st.none() | st.integers(0, len(_transport_errors(None)) - 1)),
            "slow": draw(st.booleans()) and draw(st.booleans()),
            "max_bytes": draw(st.sampled_from([64, 4096])),
        }
    return x


def respond(x: dict[str, Any]) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
    async def handler(request: httpx.Request) -> httpx.Response:
        if x["slow"]:
            await trio.sleep(3600)
        if x["fault"] is not None:
            raise _transport_errors(request)[x["fault"]]
        body = x["body"]
        headers = {}
        if x["encoding"] != "identity":
            headers["Content-Encoding"] = x["encoding"].removeprefix("bad-")
            if x["encoding"] == "gzip":
                body = gzip.compress(body)
            elif x["encoding"] == "deflate":
                body = zlib.compress(body)
        # Always a stream: httpx decodes a bytes ``content=`` at once, inside this handler,
        # where no network would.
        if x["framing"] == "length":
            headers["Content-Length"] = str(len(body))
            return httpx.Response(x["status"], headers=headers, stream=Pieces([body], None))
        if x["framing"] == "huge-length":
            headers["Content-Length"] = str(1 << 40)
        n = x["piece"]
        pieces = [body[i : i + n] for i in range(0, len(body), n)]
        return httpx.Response(x["status"], headers=headers, stream=Pieces(pieces, x["stall"]))

    return handler


# When the client stops reading early (too large, undecodable), httpx drops its inner async
# generators unexhausted and trio closes them with a ResourceWarning: encode/httpx#3686, see
# CCClient._read_body. Only that warning, from httpx's own generators, is let through.
@pytest.mark.filterwarnings(
    r"ignore:Async generator 'httpx\._[a-z_]+\.[A-Za-z_.]+' was garbage collected:ResourceWarning"
)
@prop_settings(100)
@given(exchanges())
def test_cc_client_gives_the_parsers_verdict_or_a_discovery_error(x: dict[str, Any]) -> None:
    async def main() -> Directory | DiscoveryError:
        cc = CCClient(CC, transport=httpx.MockTransport(respond(x)), max_bytes=x["max_bytes"])
        async with cc:
            try:
                return await cc.fetch()
            except DiscoveryError as exc:
                return exc

    result = run(main)
    event(f"outcome: {type(result).__name__}")
    if isinstance(result, Directory):
        check_directory(result)
    body = x["body"]
    # The handler cuts the encoded bytes into pieces, so a stall counts pieces of those.
    wire = {"gzip": gzip.compress, "deflate": zlib.compress}.get(x["encoding"], bytes)(body)
    pieces = -(-len(wire) // x["piece"])
    if x["status"] != 200 or x["fault"] is not None or x["slow"]:
        assert type(result) is DiscoveryError, result  # no answer, so no bad answer either
        return
    if x["framing"] == "huge-length":
        assert isinstance(result, BadAnswerError) and "larger than" in str(result)
        return
    if x["framing"] == "pieces" and x["stall"] is not None and x["stall"] < pieces:
        # Cut off by the deadline, or refused for its size before that: never used.
        assert isinstance(result, DiscoveryError)
        return
    if x["encoding"] == "bad-gzip":
        assert isinstance(result, BadAnswerError), result
        return
    declared = len(wire) if x["framing"] == "length" else 0
    if max(declared, len(body)) > x["max_bytes"]:
        assert isinstance(result, BadAnswerError) and "larger than" in str(result)
        return
    verdict = outcome(body)
    if isinstance(verdict, Directory):
        assert result == verdict
    else:
        assert isinstance(result, BadAnswerError), result
        assert str(verdict) in str(result)


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deep_nesting_is_a_bad_answer_not_a_crash(depth: int) -> None:
    assert isinstance(outcome(nested(depth)), BadAnswerError)
