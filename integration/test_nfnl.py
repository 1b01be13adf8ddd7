"""sdnsup.nfnl against the real kernel, each test in a network namespace of its own.

Nothing here touches the root network namespace: every kernel test creates
``sdnt-nfnl-<hex>``, runs ``nft`` and a small Python driver in it through ``ip netns exec``,
and deletes it afterwards, also when the test fails. What the kernel holds is read back two
ways, by libnftables (``nft -j list set``) and by :meth:`SetElements.list`, and compared with
what was sent; one test also sends packets through a rule that looks the sets up. The last
tests check the encoding and the decoding without a kernel.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REPO = Path(__file__).resolve().parents[1]

# The kernel tests; the encoding tests at the end need neither root nor a namespace.
netns = pytest.mark.netns

SETS = (
    "add table inet sdnsup; "
    "add set inet sdnsup dst4 { type ipv4_addr; flags interval; }; "
    "add set inet sdnsup dst6 { type ipv6_addr; flags interval; }"
)

# Runs inside the namespace: JSON list of operations on stdin, JSON list of results on stdout.
DRIVER = """
import ipaddress, json, sys
from sdnsup.errors import NftError
from sdnsup.nfnl import Change, SetElements

def nets(texts):
    return [ipaddress.ip_network(t) for t in texts]

out = []
with SetElements() as s:
    for op in json.load(sys.stdin):
        try:
            if op["op"] == "list":
                out.append(sorted(str(n) for n in s.list(op["table"], op["set"], op["v"])))
                continue
            if op["op"] == "update":
                changes = {
                    name: Change(c["v"], add=nets(c["add"]), delete=nets(c["delete"]))
                    for name, c in op["changes"].items()
                }
                s.update(op["table"], changes)
            else:
                getattr(s, op["op"])(op["table"], op["set"], op["v"], nets(op["cidrs"]))
            out.append("ok")
        except NftError as exc:
            out.append({"error": str(exc)})
print(json.dumps(out))
"""


class Netns:
    """A scratch network namespace and helpers that only ever run inside it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str, stdin: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def nft(self, script: str) -> str:
        return self.run("nft", script)

    def ops(self, *ops: dict[str, Any]) -> list[Any]:
        """Run SetElements operations in the namespace; errors come back as {"error": msg}."""
        return json.loads(self.run(sys.executable, "-c", DRIVER, stdin=json.dumps(list(ops))))

    def one(self, op: str, set_name: str, v: int, cidrs: Iterable[IPNetwork]) -> Any:
        texts = [str(c) for c in cidrs]
        return self.ops({"op": op, "table": "sdnsup", "set": set_name, "v": v, "cidrs": texts})[0]

    def listed(self, set_name: str, v: int) -> set[IPNetwork]:
        """The set as SetElements.list() reads it."""
        got = self.one("list", set_name, v, [])
        return {ipaddress.ip_network(c) for c in got}

    def nft_view(self, set_name: str) -> set[IPNetwork]:
        """The set as libnftables reads it (``nft -j list set``)."""
        listing = json.loads(self.run("nft", "-j", "list", "set", "inet", "sdnsup", set_name))
        out: set[IPNetwork] = set()
        for obj in listing["nftables"]:
            for elem in obj.get("set", {}).get("elem", []):
                out.update(_from_json(elem))
        return out


def _from_json(elem: Any) -> list[IPNetwork]:
    if isinstance(elem, str):
        return [ipaddress.ip_network(elem)]
    if "prefix" in elem:
        return [ipaddress.ip_network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")]
    if "range" in elem:
        lo, hi = (ipaddress.ip_address(a) for a in elem["range"])
        return list(ipaddress.summarize_address_range(lo, hi))  # type: ignore[arg-type]
    raise AssertionError(f"unexpected element {elem!r}")


@pytest.fixture
def ns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("needs ip and nft")
    name = f"sdnt-nfnl-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        netns = Netns(name)
        netns.run("ip", "link", "set", "lo", "up")
        netns.run("nft", SETS)
        yield netns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


# -- data ---------------------------------------------------------------------------------------


def _block_cidrs(rnd: random.Random, blocks: list[int], version: int) -> list[IPNetwork]:
    """Per block (a /24 or /120 of its own, so nothing overlaps): one random CIDR of /24-/32
    (/120-/128), or two adjacent ones."""
    host_bits = 8
    bits = 32 if version == 4 else 128
    make = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    out: list[IPNetwork] = []
    for i, block in enumerate(blocks):
        if i % 2:  # two adjacent: the first one's end is the second one's start
            size_bits = rnd.randint(0, host_bits - 1)
            slot = rnd.randrange(1 << (host_bits - size_bits - 1)) * 2
            for k in (slot, slot + 1):
                out.append(make((block + (k << size_bits), bits - size_bits)))
        else:
            size_bits = rnd.randint(0, host_bits)
            slot = rnd.randrange(1 << (host_bits - size_bits))
            out.append(make((block + (slot << size_bits), bits - size_bits)))
    return out


SPECIALS = {
    # two whole adjacent /24s; 0.0.0.0/32 (key 0, next to nft's "first segment"); the very
    # top of the address space, which has no end element
    4: ["198.18.0.0/24", "198.18.1.0/24", "0.0.0.0/32", "255.255.255.255/32"],
    6: ["2001:db8:1::/48", "2001:db8:2::/48", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"],
}


def gen_cidrs(version: int, count: int, *, seed: int = 1, specials: bool = True) -> list[IPNetwork]:
    """``count`` distinct, non-overlapping CIDRs, many of them adjacent to another one."""
    rnd = random.Random(seed)
    # /24 blocks of 10.0.0.0/8 (or /120s of 2001:db8::/104); consecutive blocks also make
    # CIDRs adjacent across block boundaries
    blocks = sorted(rnd.sample(range(1 << 16), count))
    base = int(ipaddress.ip_address("10.0.0.0" if version == 4 else "2001:db8::"))
    extra = [ipaddress.ip_network(c) for c in SPECIALS[version]] if specials else []
    nets = _block_cidrs(rnd, [base + (b << 8) for b in blocks], version)
    return nets[: count - len(extra)] + extra


# -- tests --------------------------------------------------------------------------------------


@netns
def test_add_and_delete_match_libnftables_view(ns: Netns) -> None:
    v4 = gen_cidrs(4, 1000)
    v6 = gen_cidrs(6, 100)
    assert len(set(v4)) == 1000 and len(set(v6)) == 100
    assert any(n.prefixlen == 32 for n in v4) and any(n.prefixlen == 128 for n in v6)

    assert ns.one("add", "dst4", 4, v4) == "ok"
    assert ns.one("add", "dst6", 6, v6) == "ok"
    assert ns.nft_view("dst4") == set(v4)
    assert ns.listed("dst4", 4) == set(v4)
    assert ns.nft_view("dst6") == set(v6)
    assert ns.listed("dst6", 6) == set(v6)

    # every third CIDR, which takes one of each adjacent pair in places, both of others, the
    # top-of-range CIDRs and 0.0.0.0/32
    gone4 = set(v4[::3]) | {ipaddress.ip_network("198.18.0.0/24")}
    gone4 |= {ipaddress.ip_network("255.255.255.255/32"), ipaddress.ip_network("0.0.0.0/32")}
    gone6 = set(v6[::3]) | {ipaddress.ip_network("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128")}
    assert ns.one("delete", "dst4", 4, gone4) == "ok"
    assert ns.one("delete", "dst6", 6, gone6) == "ok"
    assert ns.nft_view("dst4") == set(v4) - gone4
    assert ns.listed("dst4", 4) == set(v4) - gone4
    assert ns.nft_view("dst6") == set(v6) - gone6
    assert ns.listed("dst6", 6) == set(v6) - gone6

    # and back: re-adding what is still there is a no-op, the deleted ones come back
    assert ns.one("add", "dst4", 4, v4) == "ok"
    assert ns.nft_view("dst4") == set(v4)
    assert ns.listed("dst4", 4) == set(v4)


@netns
@pytest.mark.parametrize("order", ["low-first", "high-first", "one-batch"])
def test_adjacent_cidrs_stay_separate(ns: Netns, order: str) -> None:
    low, high = ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("10.0.1.0/24")
    if order == "one-batch":
        assert ns.one("add", "dst4", 4, [low, high]) == "ok"
    else:
        for net in [low, high] if order == "low-first" else [high, low]:
            assert ns.one("add", "dst4", 4, [net]) == "ok"
    assert ns.nft_view("dst4") == ns.listed("dst4", 4) == {low, high}

    # deleting either one leaves the other whole, and it can be put back
    for gone, kept in ((low, high), (high, low)):
        assert ns.one("delete", "dst4", 4, [gone]) == "ok"
        assert ns.nft_view("dst4") == ns.listed("dst4", 4) == {kept}
        assert ns.one("add", "dst4", 4, [gone]) == "ok"
        assert ns.nft_view("dst4") == ns.listed("dst4", 4) == {low, high}


@netns
def test_errors_are_readable_and_roll_back(ns: Netns) -> None:
    have = [ipaddress.ip_network(c) for c in ("10.0.0.0/24", "10.0.1.0/24", "10.9.0.0/16")]
    assert ns.one("add", "dst4", 4, have) == "ok"

    # idempotent add
    assert ns.one("add", "dst4", 4, have[:1]) == "ok"

    # overlap: nothing of the batch is applied, the culprit is named
    new = ipaddress.ip_network("10.5.0.0/24")
    res = ns.one("add", "dst4", 4, [new, ipaddress.ip_network("10.9.3.0/24")])
    assert res == {
        "error": "nftables refused adding 10.9.3.0/24 to inet sdnsup dst4: File exists "
        "(it overlaps an element already in the set); nothing was changed"
    }
    # /23 spanning the two adjacent /24s: its start and end both exist, but not as one
    # interval; the kernel refuses it too
    assert "error" in ns.one("add", "dst4", 4, [ipaddress.ip_network("10.0.0.0/23")])
    assert ns.listed("dst4", 4) == set(have)

    res = ns.one("delete", "dst4", 4, [ipaddress.ip_network("10.7.0.0/24")])
    assert res == {
        "error": "nftables refused deleting 10.7.0.0/24 from inet sdnsup dst4: "
        "No such file or directory (it is not in the set); nothing was changed"
    }
    # the two adjacent /24s are not a /23 to the kernel either
    assert "error" in ns.one("delete", "dst4", 4, [ipaddress.ip_network("10.0.0.0/23")])
    assert ns.nft_view("dst4") == ns.listed("dst4", 4) == set(have)

    res = ns.one("add", "nope", 4, [new])
    assert res["error"].startswith("nftables refused adding 1 CIDR to inet sdnsup nope: ")
    assert "No such file or directory" in res["error"]
    res = ns.ops({"op": "list", "table": "sdnsup", "set": "nope", "v": 4})[0]
    assert res["error"].startswith("cannot read inet sdnsup nope: No such file or directory")

    # the wrong family for the set
    res = ns.one("add", "dst4", 6, [ipaddress.ip_network("2001:db8::/64")])
    assert res == {
        "error": "nftables refused adding 2001:db8::/64 to inet sdnsup dst4: Invalid argument "
        "(is the set of this address family?); nothing was changed"
    }
    # same socket: a failed read leaves it usable
    wrong, right = ns.ops(
        {"op": "list", "table": "sdnsup", "set": "dst4", "v": 6},
        {"op": "list", "table": "sdnsup", "set": "dst4", "v": 4},
    )
    assert wrong == {
        "error": "cannot read inet sdnsup dst4 as IPv6 networks: its keys are 4 bytes long"
    }
    assert right == sorted(map(str, have))


@netns
def test_large_batch_is_one_transaction(ns: Netns) -> None:
    # 3000 CIDRs are 6 messages; the overlap sorts last, so the kernel accepted the first
    # five messages before it refused one: the whole batch must still be rolled back
    have = ipaddress.ip_network("198.51.100.0/24")
    assert ns.one("add", "dst4", 4, [have]) == "ok"
    nets = gen_cidrs(4, 2999, seed=7, specials=False)
    res = ns.one("add", "dst4", 4, [*nets, ipaddress.ip_network("198.51.100.128/25")])
    assert res == {
        "error": "nftables refused adding 198.51.100.128/25 to inet sdnsup dst4: File exists "
        "(it overlaps an element already in the set); nothing was changed"
    }
    assert ns.nft_view("dst4") == ns.listed("dst4", 4) == {have}
    # the same without the clash goes through
    assert ns.one("add", "dst4", 4, nets) == "ok"
    assert ns.nft_view("dst4") == ns.listed("dst4", 4) == {have, *nets}


@netns
def test_update_replaces_atomically_across_sets(ns: Netns) -> None:
    n = ipaddress.ip_network
    assert ns.one("add", "dst4", 4, [n("10.0.0.0/24")]) == "ok"
    assert ns.one("add", "dst6", 6, [n("2001:db8::/64")]) == "ok"
    # a CIDR replaced by an overlapping wider one, in both sets, in one transaction
    changes = {
        "dst4": {"v": 4, "add": ["10.0.0.0/23"], "delete": ["10.0.0.0/24"]},
        "dst6": {"v": 6, "add": ["2001:db8::/48"], "delete": ["2001:db8::/64"]},
    }
    assert ns.ops({"op": "update", "table": "sdnsup", "changes": changes}) == ["ok"]
    assert ns.nft_view("dst4") == ns.listed("dst4", 4) == {n("10.0.0.0/23")}
    assert ns.nft_view("dst6") == ns.listed("dst6", 6) == {n("2001:db8::/48")}

    # a failing part (dst6, sent after dst4) rolls back the dst4 part too
    changes = {
        "dst4": {"v": 4, "add": ["10.1.0.0/24"], "delete": []},
        "dst6": {"v": 6, "add": ["2001:db8:0:1::/64"], "delete": []},
    }
    res = ns.ops({"op": "update", "table": "sdnsup", "changes": changes})[0]
    assert res["error"].startswith("nftables refused adding 2001:db8:0:1::/64 to inet sdnsup dst6")
    assert ns.nft_view("dst4") == ns.listed("dst4", 4) == {n("10.0.0.0/23")}
    assert ns.nft_view("dst6") == ns.listed("dst6", 6) == {n("2001:db8::/48")}


@netns
def test_reads_and_edits_what_nft_wrote(ns: Netns) -> None:
    # nft into an empty set adds its 0.0.0.0 "first segment"; a range that is no CIDR; an
    # open interval at the top, which nft marks with userdata
    ns.nft(
        "add element inet sdnsup dst4 { 10.0.0.0/24, 10.0.1.0/24, 10.1.0.0-10.1.0.9, "
        "255.255.255.0/24 }"
    )
    n = ipaddress.ip_network
    want = {n("10.0.0.0/24"), n("10.0.1.0/24"), n("10.1.0.0/29"), n("10.1.0.8/31")}
    want.add(n("255.255.255.0/24"))
    assert ns.listed("dst4", 4) == ns.nft_view("dst4") == want

    assert ns.one("delete", "dst4", 4, [n("10.0.0.0/24"), n("255.255.255.0/24")]) == "ok"
    assert ns.one("add", "dst4", 4, [n("0.0.0.0/8")]) == "ok"  # next to nft's 0.0.0.0 end
    want = {n("0.0.0.0/8"), n("10.0.1.0/24"), n("10.1.0.0/29"), n("10.1.0.8/31")}
    assert ns.listed("dst4", 4) == ns.nft_view("dst4") == want

    # and nft can still edit what we wrote
    ns.nft("delete element inet sdnsup dst4 { 0.0.0.0/8 }")
    ns.nft("add element inet sdnsup dst4 { 10.0.0.0/24 }")
    want = {n("10.0.0.0/24"), n("10.0.1.0/24"), n("10.1.0.0/29"), n("10.1.0.8/31")}
    assert ns.listed("dst4", 4) == ns.nft_view("dst4") == want


# Sends one UDP datagram to each address given on stdin (JSON list). Default routes through a
# veth take them, so each passes the output hook once (before neighbour resolution, which
# then fails harmlessly).
SENDER = """
import json, socket, sys
for addr in json.load(sys.stdin):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (addr, 9))
"""


def _covered(nets: Iterable[IPNetwork]) -> Any:
    spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in nets)
    starts = [s for s, _ in spans]

    def inside(addr: int) -> bool:
        i = bisect.bisect_right(starts, addr) - 1
        return i >= 0 and addr <= spans[i][1]

    return inside


@netns
def test_packets_match_the_set(ns: Netns) -> None:
    # a veth pair (the dummy driver may be missing) with default routes through it
    ns.run("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
    ns.run("ip", "link", "set", "vb", "up")
    ns.run("ip", "link", "set", "va", "up")
    ns.run("ip", "addr", "add", "192.0.2.1/24", "dev", "va")
    ns.run("ip", "-6", "addr", "add", "2001:db8:ffff::1/64", "dev", "va", "nodad")
    ns.run("ip", "route", "add", "default", "dev", "va")
    ns.run("ip", "-6", "route", "add", "default", "dev", "va")
    ns.nft(
        "add set inet sdnsup hit4 { type ipv4_addr; flags dynamic; size 65535; }; "
        "add set inet sdnsup hit6 { type ipv6_addr; flags dynamic; size 65535; }; "
        "add chain inet sdnsup out { type filter hook output priority 0; }; "
        "add rule inet sdnsup out ip daddr @dst4 add @hit4 { ip daddr }; "
        "add rule inet sdnsup out ip6 daddr @dst6 add @hit6 { ip6 daddr }"
    )
    # no 0.0.0.0, broadcast or multicast: those cannot be sent to like unicast
    v4 = [n for n in gen_cidrs(4, 1000) if str(n) not in ("0.0.0.0/32", "255.255.255.255/32")]
    v6 = [n for n in gen_cidrs(6, 100) if not n.is_multicast]
    assert ns.one("add", "dst4", 4, v4) == "ok"
    assert ns.one("add", "dst6", 6, v6) == "ok"
    gone4, gone6 = set(v4[1::4]), set(v6[1::4])  # includes one of many adjacent pairs
    assert ns.one("delete", "dst4", 4, gone4) == "ok"
    assert ns.one("delete", "dst6", 6, gone6) == "ok"
    kept4, kept6 = set(v4) - gone4, set(v6) - gone6

    probes: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for net in [*v4[:300], *v6]:  # first, last and both neighbours of each CIDR
        first, last = net.network_address, net.broadcast_address
        probes.update((first, last, first - 1, last + 1))
    probes = {p for p in probes if p != ipaddress.ip_address("192.0.2.1")}
    ns.run(sys.executable, "-c", SENDER, stdin=json.dumps(sorted(map(str, probes), key=str)))

    hits: set[str] = set()
    for name in ("hit4", "hit6"):
        listing = json.loads(ns.run("nft", "-j", "list", "set", "inet", "sdnsup", name))
        for obj in listing["nftables"]:
            hits.update(str(e) for e in obj.get("set", {}).get("elem", []))
    in4, in6 = _covered(kept4), _covered(kept6)
    want = {str(p) for p in probes if (in4 if p.version == 4 else in6)(int(p))}
    assert hits == want
    assert len(want) > 100 and len(probes - {ipaddress.ip_address(h) for h in hits}) > 100


# -- encoding, without a kernel -------------------------------------------------------------

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="nft's bytes below were captured on x86"
)


@little_endian
def test_elements_are_the_bytes_nft_sends() -> None:
    from sdnsup.nfnl import _CODECS

    codec = _CODECS[4]
    net = ipaddress.IPv4Network("10.0.1.0/24")
    start, end = codec.cidr_elements(int(net.network_address), net.prefixlen)
    # strace of `nft add element inet t s { 10.0.1.0/24 }`: the start element verbatim
    assert start == bytes.fromhex("1000 0180 0c00 0180 0800 0100 0a000100")
    # nft sends the end element as type 2 (its index) with FLAGS before KEY; ours is the
    # kernel's own order and type, same attributes
    assert end == bytes.fromhex("1800 0180 0c00 0180 0800 0100 0a000200 0800 0300 00000001")
    # `nft delete element inet t s { 255.255.255.255 }`: open interval, userdata, verbatim
    (top,) = codec.cidr_elements(0xFFFFFFFF, 32)
    assert top == bytes.fromhex(
        "1c00 0180 0c00 0180 0800 0100 ffffffff 0a00 0600 01040100 0000 0000"
    )
    (top6,) = _CODECS[6].cidr_elements(0xFFFF << 112, 16)  # ffff::/16 reaches the top too
    assert top6.endswith(bytes.fromhex("0a00 0600 01040100 0000 0000"))


def test_messages_keep_pairs_and_order() -> None:
    from sdnsup.nfnl import MAX_ELEMENTS_PER_MESSAGE, _encode

    nets = gen_cidrs(4, 1500, specials=True)
    chunks = list(_encode(4, [*reversed(nets), nets[0], nets[1]]))  # unsorted, duplicates
    sent = [net for chunk, _ in chunks for net in chunk]
    assert sent == sorted(nets, key=lambda n: (int(n.network_address), n.prefixlen))
    for chunk, elements in chunks:
        sizes = [
            2 if n.broadcast_address != ipaddress.IPv4Address(0xFFFFFFFF) else 1 for n in chunk
        ]
        assert sum(sizes) <= MAX_ELEMENTS_PER_MESSAGE
        # both elements of every CIDR in the chunk are in this message: 16 + 24 bytes a pair,
        # 28 for the open interval
        assert len(elements) == sum(40 if size == 2 else 28 for size in sizes)
        assert len(elements) < 65535  # one nla_len
    # the open interval (255.255.255.255/32) is the very last element of its message
    assert str(chunks[-1][0][-1]) == "255.255.255.255/32"
    with pytest.raises(ValueError, match="not an IPv4 network"):
        list(_encode(4, [ipaddress.IPv6Network("2001:db8::/64")]))


def test_pairing_dumped_elements() -> None:
    from sdnsup.nfnl import _pair, _to_cidrs

    def start(addr: str) -> int:
        return int(ipaddress.IPv4Address(addr)) << 1 | 1

    def end(addr: str) -> int:
        return int(ipaddress.IPv4Address(addr)) << 1

    keys = [
        end("0.0.0.0"),  # nft's first segment: ignored
        start("10.0.0.0"),
        end("10.0.1.0"),  # adjacent: this end and the next start share a key
        start("10.0.1.0"),
        end("10.0.2.0"),
        start("10.1.0.0"),  # a range, not a CIDR
        end("10.1.0.10"),
        start("255.255.255.0"),  # open interval: runs to the top
    ]
    ranges = _pair(list(reversed(keys)), 4)  # the kernel dumps in descending order
    assert _to_cidrs(4, ranges) == {
        ipaddress.IPv4Network(c)
        for c in ("10.0.0.0/24", "10.0.1.0/24", "10.1.0.0/29", "10.1.0.8/31", "255.255.255.0/24")
    }


@netns
def test_the_generation_moves_by_one_per_committed_transaction_whoever_commits(ns: Netns) -> None:
    """What tells sdnsup, after writing its CIDRs without listening to nftables events,
    whether another process changed nftables meanwhile."""
    code = (
        "import json, subprocess\n"
        "from sdnsup.nft import LibNftables\n"
        "nft = LibNftables()\n"
        "g0, c0 = nft.generation(), nft.commits\n"
        "subprocess.run(['nft', 'add table inet sdnt_other'], check=True)\n"
        "g1 = nft.generation()\n"
        "subprocess.run(['nft', 'list ruleset'], check=True, capture_output=True)\n"
        "g2 = nft.generation()\n"
        "assert nft.delete('sdnt_other')\n"
        "print(json.dumps([g0, c0, g1, g2, nft.generation(), nft.commits]))\n"
    )
    g0, c0, g1, g2, g3, c3 = json.loads(ns.run(sys.executable, "-c", code))
    assert c0 == 0 and g1 == g0 + 1  # another process's commit
    assert g2 == g1  # a listing commits nothing
    assert (g3, c3) == (g2 + 1, 1)  # our own commit: counted on both sides
