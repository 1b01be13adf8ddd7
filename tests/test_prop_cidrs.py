"""Property tests: the ``-r`` parser and the set builder agree with Python's ``ipaddress``.

* :func:`sdnsup.cidrs.parse_cidrs` accepts a list exactly when every entry is a CIDR without
  host bits (``/0`` only with ``--allow-default``), with no duplicate (equivalent spellings
  included) and no CIDR inside another; it then returns the networks ``ipaddress`` reads,
  split by family. Otherwise it reports every problem once, at its ``-r`` or ``FILE:LINE``.
* What the applier renders from those CIDRs (the ``dst4``/``dst6`` sets, the JSON libnftables
  loads, the routes) holds exactly the same networks (the raw nfnetlink encoding of the
  interval-set elements is checked in ``tests/test_nfnl.py``).

The generators know which network each spelling means (``10.0.0.0/255.255.255.0``,
``FD00:0::/064``, ``::ffff:1.2.3.0/120``...), so ``ipaddress`` itself is checked against them
before the parser is checked against both.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sdnsup.applier import render
from sdnsup.cidrs import (
    MAX_REPORTED_PROBLEMS,
    parse_cidrs,
    shown_entry,
)
from sdnsup.errors import ConfigError
from sdnsup.nft import (
    NftTable,
    canonical,
    element_json,
    merge_shards,
    parse_element,
    ruleset_objects,
    split_elements,
    table_commands,
)
from sdnsup.routes import IPAddress, Link
from sdnsup.state import NHID_V4, NHID_V6, DesiredState, Settings
from tests.fakes import link
from tests.strategies import (
    IPv4Network,
    IPv6Network,
    Net,
    disjoint,
    net_lists,
    nets,
    prop_settings,
    v6_nets,
)

# --- spellings ---------------------------------------------------------------------------------


def _dotted_tail(net: IPv6Network) -> str:
    """The network address with its last 32 bits as a dotted quad (``::ffff:10.0.0.0``)."""
    groups = net.network_address.exploded.split(":")[:6]
    quad = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
    return f"{':'.join(groups)}:{quad}"


def spellings(net: Net) -> list[str]:
    """Texts that ``ipaddress`` reads as exactly ``net`` (documented forms only)."""
    addr, plen = net.network_address, net.prefixlen
    out = [f"{addr}/{plen}", f"{addr}/{plen:03d}"]
    if plen == net.max_prefixlen:
        out.append(str(addr))  # a bare address is a host route
    if isinstance(net, IPv4Network):
        out.append(f"{addr}/{net.netmask}")
        # A hostmask of all zeros or all ones reads as a netmask first, i.e. /0 or /32.
        if 0 < plen < 32:
            out.append(f"{addr}/{net.hostmask}")
    else:
        out += [f"{addr.exploded}/{plen}", f"{str(addr).upper()}/{plen}"]
        out.append(f"{_dotted_tail(net)}/{plen}")
    return out


PADS = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def spelled(draw: st.DrawFn, net: Net) -> str:
    return draw(PADS) + draw(st.sampled_from(spellings(net))) + draw(PADS)


# --- entries: what the user typed, and what it should mean -------------------------------------

Kind = Literal["ok", "host bits", "malformed"]


@dataclass(frozen=True)
class Entry:
    text: str
    kind: Kind
    net: Net | None  # "ok": the network; "host bits": the suggested one


@st.composite
def good_entries(draw: st.DrawFn) -> Entry:
    net = draw(nets)
    return Entry(draw(spelled(net)), "ok", net)


@st.composite
def host_bit_entries(draw: st.DrawFn) -> Entry:
    net = draw(nets.filter(lambda n: n.prefixlen < n.max_prefixlen))
    offset = draw(st.integers(1, net.num_addresses - 1))
    return Entry(f"{net.network_address + offset}/{net.prefixlen}", "host bits", net)


# Characters str.splitlines() breaks lines at besides "\n" and "\r" (see the comment test).
OTHER_LINE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
MALFORMED = [
    "10.0.0.0/33",
    "::/129",
    "10.0.0/24",
    "010.0.0.0/8",  # leading zeros: refused by ipaddress since 3.9.5 (octal ambiguity)
    "10.0.0.0/+8",
    "10.0.0.0/0x8",
    "10.0.0.0/",
    "/24",
    "10.0.0.0 /24",
    "fd00:::/64",
    "fd00::/64/64",
    "10.0.0.0/255.0.255.0",  # not a contiguous mask
    "banana",
]


def _parses(text: str) -> bool:
    try:
        ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return False
    return True


# Free text that no CIDR list could contain as one entry: no comma (separator), "#" (comment),
# line break, or leading "@" (file); and that ipaddress rejects even without strict.
_free_text = st.text(
    st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters=",#\n\r" + OTHER_LINE_BREAKS,
    ),
    min_size=1,
    max_size=20,
).filter(lambda t: t.strip() != "" and not t.strip().startswith("@") and not _parses(t))
malformed_entries = st.one_of(st.sampled_from(MALFORMED), _free_text).map(
    lambda t: Entry(t, "malformed", None)
)
entries = st.one_of(good_entries(), good_entries(), host_bit_entries(), malformed_entries)


@prop_settings(100)
@given(entries)
def test_the_spellings_mean_what_the_generator_says(entry: Entry) -> None:
    """The generators' claims about ipaddress, so that a later failure blames the parser."""
    text = entry.text.strip()
    if entry.kind == "ok":
        assert ipaddress.ip_network(text) == entry.net
    elif entry.kind == "host bits":
        with pytest.raises(ValueError, match="host bits set"):
            ipaddress.ip_network(text)
        assert ipaddress.ip_network(text, strict=False) == entry.net
    else:
        assert not _parses(text)


# --- what parse_cidrs must report ---------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    where: str
    kind: str
    net: Net | None
    text: str
    first: str = ""  # a duplicate: where the first one was


def expected(
    located: Sequence[tuple[str, Entry]], allow_default: bool
) -> tuple[list[Problem], dict[Net, str]]:
    """The problems the documented rules imply, and the accepted networks with their place.

    Nesting is found by comparing every pair, independently of the parser's sorted sweep.
    """
    problems: list[Problem] = []
    accepted: dict[Net, str] = {}
    for where, e in located:
        text = e.text.strip()
        if e.kind != "ok":
            problems.append(Problem(where, e.kind, e.net, text))
            continue
        assert e.net is not None
        if e.net.prefixlen == 0 and not allow_default:
            problems.append(Problem(where, "default", e.net, text))
        elif e.net in accepted:
            problems.append(Problem(where, "duplicate", e.net, text, accepted[e.net]))
        else:
            accepted[e.net] = where
    for n, where in accepted.items():
        if any(
            m != n and m.version == n.version and n.subnet_of(m)  # type: ignore[arg-type]
            for m in accepted
        ):
            problems.append(Problem(where, "overlap", n, str(n)))
    return problems, accepted


_OVERLAP_RE = re.compile(r" overlaps (\S+) \(([^)]*)\); keep only one$")


def matches(line: str, p: Problem, accepted: dict[Net, str]) -> bool:
    """Whether a reported line is problem ``p``: at its place, naming the culprit and why."""
    if not line.startswith(f"{p.where}: "):
        return False
    rest = line[len(p.where) + 2 :]
    if p.kind == "malformed":
        # Escaped, it may hold anything; from a file, only what could be a CIDR is shown.
        if p.where == "-r":
            return rest.startswith(repr(p.text))
        return rest.startswith(shown_entry(p.text))
    if p.kind == "host bits":
        return rest.startswith(p.text) and f"host bits set (did you mean {p.net}?)" in rest
    if p.kind == "default":
        return rest.startswith(str(p.net)) and "--allow-default" in rest
    if p.kind == "duplicate":
        return rest == f"{p.net} duplicates {p.first}"
    found = _OVERLAP_RE.search(rest)
    if not rest.startswith(f"{p.net} overlaps ") or found is None:
        return False
    cover = ipaddress.ip_network(found[1])
    # The named cover must be an accepted CIDR that really contains this one, at its place.
    return (
        cover in accepted
        and accepted[cover] == found[2]
        and p.net is not None
        and p.net.version == cover.version
        and p.net.subnet_of(cover)  # type: ignore[arg-type]
    )


def check_report(message: str, problems: list[Problem], accepted: dict[Net, str]) -> None:
    header = "invalid CIDRs:\n  "
    assert message.startswith(header), message
    lines = message[len(header) :].split("\n  ")
    hidden = 0
    if lines[-1].startswith("... and ") and lines[-1].endswith(" more"):
        hidden = int(lines.pop()[len("... and ") : -len(" more")])
    assert len(lines) == min(len(problems), MAX_REPORTED_PROBLEMS)
    assert len(lines) + hidden == len(problems)
    unmatched = list(problems)
    for line in lines:
        hit = next((p for p in unmatched if matches(line, p, accepted)), None)
        assert hit is not None, f"unexpected line {line!r}; expected one of {unmatched}"
        unmatched.remove(hit)


# --- where each entry goes: -r items, and lines of an @FILE -------------------------------------

comments = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r" + OTHER_LINE_BREAKS),
    max_size=12,
)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[Entry], list[bool], list[str]]:
    """Entries, which of them go to the file, and filler lines (blank or comment) for it."""
    items = draw(st.lists(entries, max_size=24))
    in_file = [draw(st.booleans()) for _ in items]
    fillers = draw(st.lists(st.one_of(st.just(""), comments.map(lambda c: f"  # {c}"))))
    return items, in_file, fillers


def build_specs(
    draw: st.DrawFn,
    items: list[Entry],
    in_file: list[bool],
    fillers: list[str],
    path: Path,
) -> tuple[list[str], list[tuple[str, Entry]]]:
    """The ``-r`` values (the file named once, among them) and each entry with its place."""
    lines: list[str] = []
    file_entries: list[tuple[str, Entry]] = []
    pending = list(fillers)
    for e, f in zip(items, in_file, strict=True):
        if not f:
            continue
        while pending and draw(st.booleans()):
            lines.append(pending.pop())
        tail = draw(st.one_of(st.just(""), comments.map(lambda c: f" #{c}")))
        lines.append(e.text + tail)
        file_entries.append((f"{path}:{len(lines)}", e))
    lines += pending
    path.write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")

    cli = [e for e, f in zip(items, in_file, strict=True) if not f]
    # Split the -r entries over several -r values; the file goes at a drawn position. Empty
    # items (",,", a trailing comma) are skipped by the parser.
    cut = sorted(draw(st.lists(st.integers(0, len(cli)), max_size=3)))
    groups = [cli[a:b] for a, b in zip([0, *cut], [*cut, len(cli)], strict=True)]
    file_at = draw(st.integers(0, len(groups))) if file_entries else -1
    specs: list[str] = []
    located: list[tuple[str, Entry]] = []
    for i in range(len(groups) + 1):
        if i == file_at:
            specs.append(f"@{path}")
            located += file_entries
        if i < len(groups):
            sep = draw(st.sampled_from([",", ", ", ",,"]))
            specs.append(sep.join(e.text for e in groups[i]))
            located += [("-r", e) for e in groups[i]]
    return specs, located


@prop_settings(150)
@given(layouts(), st.booleans(), st.booleans(), st.data())
def test_parse_cidrs_agrees_with_ipaddress(
    layout: tuple[list[Entry], list[bool], list[str]],
    allow_default: bool,
    strict: bool,
    data: st.DataObject,
) -> None:
    items, in_file, fillers = layout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cidrs.txt"
        specs, located = build_specs(data.draw, items, in_file, fillers, path)
        problems, accepted = expected(located, allow_default)
        if not strict:
            # Merged, not refused: the result is the union of every good entry.
            problems = [p for p in problems if p.kind not in ("duplicate", "overlap")]
            union = {
                v: set(ipaddress.collapse_addresses(n for n in accepted if n.version == v))
                for v in (4, 6)
            }
        try:
            result = parse_cidrs(specs, allow_default=allow_default, strict=strict)
        except ConfigError as exc:
            message = str(exc)
            if problems:
                check_report(message, problems, accepted)
            else:
                assert not accepted and message.startswith("no CIDRs given"), message
            return
    assert not problems, f"accepted despite {problems}"
    if strict:
        assert result.v4 == {n for n in accepted if n.version == 4}
        assert result.v6 == {n for n in accepted if n.version == 6}
        assert len(result) == len(accepted)
    else:
        assert (result.v4, result.v6) == (union[4], union[6])
        good = sum(1 for _, e in located if e.kind == "ok")
        r = result.report
        assert (r.read, r.steered) == (len(located), len(result))
        assert r.duplicates + r.merged + r.steered == good
    assert all(isinstance(n, IPv4Network) for n in result.v4)
    assert all(isinstance(n, IPv6Network) for n in result.v6)
    for n in (*result.v4, *result.v6):
        # Normalised: the canonical text reads back as the same network.
        assert ipaddress.ip_network(str(n)) == n


# --- bugs found by fuzzing ---------------------------------------------------------------------


@st.composite
def zoned(draw: st.DrawFn) -> str:
    net = draw(v6_nets)
    zone = draw(st.sampled_from(["eth0", "1", "lo", "br-lan"]))
    return f"{net.network_address}%{zone}/{net.prefixlen}"


@prop_settings(50)
@given(st.lists(st.one_of(good_entries().map(lambda e: e.text), zoned()), min_size=1))
@example(["fd00::%eth0/64"])
def test_every_accepted_cidr_is_what_the_kernel_reads_back(specs: list[str]) -> None:
    """The kernel keeps a route's or a set element's address and prefix length, nothing more:
    a CIDR the parser accepts must equal the network rebuilt from those two.

    Found by this test: ``ipaddress`` accepts a zone index (``fd00::%eth0/64``) and keeps it
    in the network, which then equals no kernel read-back (libnftables refused to load it;
    by netlink every re-read deleted the route the next one re-added).
    """
    try:
        result = parse_cidrs(specs, allow_default=True)
    except ConfigError:
        return
    for n in (*result.v4, *result.v6):
        assert type(n)((int(n.network_address), n.prefixlen)) == n, f"{n} is not a plain CIDR"


@prop_settings(50)
@given(good_entries(), comments, st.sampled_from(OTHER_LINE_BREAKS), comments)
@example(Entry("10.0.0.0/24", "ok", IPv4Network("10.0.0.0/24")), "pasted", "\u2028", "text").via(
    "a comment pasted with a Unicode LINE SEPARATOR"
)
def test_a_comment_is_a_comment_whatever_characters_it_holds(
    entry: Entry, before: str, odd: str, after: str
) -> None:
    """``#`` starts a comment that runs to the end of the line, as an editor shows it.

    Found by this test: ``str.splitlines()`` also breaks at form feed, vertical tab,
    U+001C-U+001E, NEL (U+0085) and U+2028/U+2029, so the rest of such a comment became an
    entry of its own and every later line number was off by one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cidrs.txt"
        path.write_text(f"{entry.text} # {before}{odd}{after}\n10.0.0.0/33\n", encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            parse_cidrs([f"@{path}"], allow_default=True)
    # Only the bad CIDR on line 2 is reported, and as line 2.
    reported = str(info.value).split("\n  ")[1:]
    assert len(reported) == 1, reported
    assert reported[0].startswith(f"{path}:2: '10.0.0.0/33'"), reported


# --- the set builder ---------------------------------------------------------------------------

AP4, AP6 = ipaddress.IPv4Address("10.77.0.11"), ipaddress.IPv6Address("fd77::11")


def _resolver(on_link: bool) -> Callable[[IPAddress], Link | None]:
    return lambda _addr: link(2, "eth0") if on_link else None


def _set_elements(commands: list[dict[str, Any]], logical: str) -> list[Net]:
    """Every element the libnftables load puts into the kernel sets of ``logical``."""
    out: list[Net] = []
    for cmd in commands:
        body = cmd.get("add", {}).get("set")
        if body is None:
            continue
        name = body["name"]
        if name == logical or re.fullmatch(rf"{logical}_\d+", name):
            out += [n for e in body.get("elem", []) for n in parse_element(e)]
    return out


@prop_settings(100)
@given(net_lists.map(disjoint), st.booleans(), st.booleans(), st.booleans())
def test_rendered_sets_and_routes_hold_exactly_the_cidrs(
    cidrs: list[Net], with_ap4: bool, with_ap6: bool, on_link: bool
) -> None:
    """dst4/dst6, the JSON the table is loaded from, and the routes hold the CIDRs of their
    family, each once; the exempt sets hold the APs; any element survives nft's JSON form."""
    v4 = frozenset(n for n in cidrs if isinstance(n, IPv4Network))
    v6 = frozenset(n for n in cidrs if isinstance(n, IPv6Network))
    desired = DesiredState(
        cidrs4=v4, cidrs6=v6, ap4=AP4 if with_ap4 else None, ap6=AP6 if with_ap6 else None
    )
    state, _ = render(desired, _resolver(on_link))
    if not cidrs:
        assert state.table is None and not state.routes and not state.nexthops
        return
    table = state.table
    assert table is not None
    assert table.set("dst4") == v4 and table.set("dst6") == v6
    assert table.set("exempt4") == ({IPv4Network(AP4)} if with_ap4 else set())
    assert table.set("exempt6") == ({IPv6Network(AP6)} if with_ap6 else set())
    t = Settings().table
    want_routes = {k: v for k, v in (((t, NHID_V4), v4), ((t, NHID_V6), v6)) if v}
    assert dict(state.routes) == want_routes
    commands = table_commands(table)
    for logical, want in (("dst4", v4), ("dst6", v6)):
        loaded = _set_elements(commands, logical)
        assert Counter(loaded) == Counter(want)  # each CIDR exactly once, of its family
    for n in cidrs:
        assert parse_element(element_json(n)) == [n]


@prop_settings(50)
@given(
    net_lists.map(disjoint),
    st.sampled_from([1, 2, 4, 8, 64]),
)
def test_sharded_sets_hold_each_cidr_once_and_merge_back(cidrs: list[Net], shards: int) -> None:
    """Past a size, a destination set is split into shards; the split must lose nothing,
    duplicate nothing, and read back (merged) as the logical set."""
    v4 = frozenset(n for n in cidrs if n.version == 4)
    parts = split_elements("dst4", shards, v4)
    assert len(parts) == shards
    assert sum(len(p) for p in parts.values()) == len(v4)
    assert frozenset().union(*parts.values()) == v4
    objects = ruleset_objects(Settings(), {"dst4": shards} if shards > 1 else {})
    declared = {o["set"]["name"] for o in objects if "set" in o}
    assert set(parts) <= declared
    table = merge_shards(
        NftTable("sdnsup", canonical(objects)), {k: v for k, v in parts.items() if v}
    )
    assert table.set("dst4") == v4
    assert table.ruleset == canonical(objects)  # no shard holds a CIDR it should not


# Entries that look like IPv4 CIDRs, most of them nearly right: octets with leading zeros,
# too large or too many, prefixes with leading zeros, out of range or with host bits set.
_octet = st.one_of(
    st.integers(0, 255).map(str), st.sampled_from(["256", "01", "00", "0x1", "", " 1", "\uff11"])
)
_prefix = st.one_of(
    st.integers(0, 32).map(str), st.sampled_from(["08", "033", "33", "", "-1", "+8", "²"])
)
_almost_v4 = st.builds(
    lambda octets, sep, prefix: ".".join(octets) + sep + prefix,
    st.lists(_octet, min_size=3, max_size=5),
    st.sampled_from(["/", "/", "/", "", "//"]),
    _prefix,
)


@given(st.one_of(_almost_v4, st.text(max_size=24)))
@example("10.0.0.0/08")
@example("10.0.0.1/8")
@example("0.0.0.0/0")
@example("1.2.3.4/32")
def test_the_fast_ipv4_reader_agrees_with_ipaddress_on_every_entry(text):
    """plain_ipv4 takes an entry only if ipaddress.ip_network(strict=True) reads it as the
    same IPv4 network; everything else is left to the slow path and its error messages."""
    from sdnsup.cidrs import plain_ipv4

    key = plain_ipv4(text)
    fast = None if key is None else ipaddress.IPv4Network((key >> 8, key & 0xFF))
    try:
        slow = ipaddress.ip_network(text, strict=True)
    except ValueError:
        slow = None
    if fast is not None:
        assert slow == fast and isinstance(slow, ipaddress.IPv4Network)
    elif isinstance(slow, ipaddress.IPv4Network) and "/" in text:
        # left to the slow path only in forms the fast one does not read (a netmask)
        assert not re.fullmatch(r"[0-9.]+/[0-9]{1,2}", text), text


_small_v4 = st.builds(
    lambda a, p: ipaddress.IPv4Network((a >> p << p, 32 - p)),
    st.integers(0, 2**32 - 1),
    st.integers(2, 10),
)
_small_v6 = st.builds(
    lambda a, p: ipaddress.IPv6Network((a >> p << p, 128 - p)),
    st.integers(0, 2**128 - 1),
    st.integers(0, 100),
)


@prop_settings(150)
@given(
    st.lists(st.one_of(_small_v4, _small_v6), min_size=1, max_size=12),
    st.lists(st.one_of(_small_v4, _small_v6), min_size=1, max_size=12),
    st.booleans(),
)
def test_a_reload_gives_what_a_fresh_parse_gives_and_keeps_unchanged_cidrs_as_they_were(
    before: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    after: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    strict: bool,
) -> None:
    """``previous`` only changes which objects the result is made of, never what it holds."""
    try:
        old = parse_cidrs([",".join(map(str, before))])
        fresh = parse_cidrs([",".join(map(str, after))], strict=strict)
    except ConfigError:
        return  # strict and overlapping: nothing to reload to
    new = parse_cidrs([",".join(map(str, after))], strict=strict, previous=old)
    assert (new.v4, new.v6) == (fresh.v4, fresh.v6)
    assert new.report == fresh.report
    kept = {n: n for n in old.v4 | old.v6}
    for net in new.v4 | new.v6:
        if net in kept:
            assert net is kept[net]
    if (fresh.v4, fresh.v6) == (old.v4, old.v6):
        assert new.v4 is old.v4 and new.v6 is old.v6
