"""The ``inet sdnsup`` nftables table: rendered as libnftables JSON, read back, compared.

The table is the seed's connmark rule set, narrowed to the user's destinations by set lookups
and masked so that other users of the packet and conntrack marks keep their bits::

    prerouting (filter, mangle):  exempt -> return; NEW TCP but not a SYN (a connection
                                  conntrack adopted mid-stream) -> return;
                                  NEW to @dst -> ct mark |= MARK;
                                  ct mark has MARK -> meta mark |= MARK   (also on replies,
                                  which strict rp_filter with src_valid_mark=1 needs)
    input      (filter, mangle):  NEW connection addressed to this host -> clear MARK, so
                                  replies to inbound connections use the normal route
    output     (route,  mangle):  as prerouting for locally originated traffic; type ``route``
                                  because only a route chain makes the kernel re-route a
                                  packet whose mark it changed
    postrouting (nat,   srcnat):  marked traffic whose next hop is an AP, and whose source is
                                  not an address of the interface it leaves by, takes that
                                  interface's address: a host whose default route uses
                                  another interface would send a source the AP cannot answer

The non-element part of the table (sets' declarations, chains, rules) is compared as one
canonical JSON string, in the exact form ``nft -j list`` prints, so a table changed by hand is
detected and replaced atomically. Set elements are compared as sets of networks and patched
with element deltas.

Large destination sets are sharded. Committing any change to an interval set makes the kernel
(6.x) redo work in proportion to the set's size: one added element costs 0.08 ms at 1k
elements, 0.5 ms at 10k, but 20-25 ms at 100k. So past :data:`SHARD_SIZE` CIDRs, ``dst4`` is
split into ``dst4_0`` .. ``dst4_{K-1}`` (K a power of two), each CIDR in the shard its hash
picks, with one lookup rule per shard. Only NEW connections reach those lookups (``ct state
new`` is matched first), so established traffic never pays for them. Everywhere but the
kernel (desired state, diff, status), the sets stay one logical ``dst4``/``dst6``.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sdnsup.cidrs import NO_KNOWN_NETWORKS, KnownNetworks
from sdnsup.errors import NftError
from sdnsup.state import Settings

FAMILY = "inet"
# set name -> (element type, address family version)
ADDRESS_SETS: dict[str, tuple[str, Literal[4, 6]]] = {
    "dst4": ("ipv4_addr", 4), "dst6": ("ipv6_addr", 6),
    "exempt4": ("ipv4_addr", 4), "exempt6": ("ipv6_addr", 6),
}  # fmt: skip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Element = Network

# The destination sets that may be sharded (the exempt sets hold a handful of addresses).
SHARDED = ("dst4", "dst6")
# Largest shard aimed for: an element change then commits in about 0.5 ms (see above).
SHARD_SIZE = 8192
# 64 x 8192 = 512k CIDRs before shards grow past SHARD_SIZE; past that, commits slow down
# gradually rather than the ruleset growing without bound.
MAX_SHARDS = 64


def shard_count(elements: int) -> int:
    """Shards for a set of ``elements`` CIDRs: 1 up to SHARD_SIZE, then a power of two.

    Powers of two change rarely (each doubling of the CIDR count), and a change of the count
    changes the ruleset, which means one whole-table load.
    """
    k = 1
    while k < MAX_SHARDS and elements > k * SHARD_SIZE:
        k *= 2
    return k


def shard_of(elem: Element, shards: int) -> int:
    """The shard holding ``elem``. Tuple hashing of ints is not randomised per process (only
    str/bytes hashing is), so a restarted sdnsup finds each CIDR where its predecessor put it;
    the CIDR's own hash is not used because it maps aligned networks to few shards."""
    return hash((int(elem.network_address), elem.prefixlen)) % shards


def shard_names(name: str, shards: int) -> list[str]:
    """The kernel sets holding the logical set ``name``."""
    return [name] if shards == 1 else [f"{name}_{i}" for i in range(shards)]


def split_elements(
    name: str, shards: int, elements: Iterable[Element]
) -> dict[str, frozenset[Element]]:
    """Kernel set name -> the part of ``elements`` it holds."""
    names = shard_names(name, shards)
    if shards == 1:
        return {name: frozenset(elements)}
    parts: list[set[Element]] = [set() for _ in names]
    for e in elements:
        parts[shard_of(e, shards)].add(e)
    return {n: frozenset(p) for n, p in zip(names, parts, strict=True)}


@dataclass(frozen=True, slots=True)
class NftTable:
    """The table as sdnsup sees it: its ruleset text and the contents of its sets."""

    name: str
    ruleset: str
    elements: Mapping[str, frozenset[Element]] = field(default_factory=dict)
    # logical set -> number of kernel sets it is sharded into; absent means 1
    shards: Mapping[str, int] = field(default_factory=dict)
    # the rules of PINS_CHAIN (canonical JSON), which change apart from the ruleset
    pins: str = "[]"

    def set(self, name: str) -> frozenset[Element]:
        return self.elements.get(name, frozenset())

    def kernel_sets(self) -> dict[str, frozenset[Element]]:
        """Every kernel set of the table (shards included) with the elements it holds."""
        out: dict[str, frozenset[Element]] = {}
        for name, elems in self.elements.items():
            out.update(split_elements(name, self.shards.get(name, 1), elems))
        return {k: v for k, v in out.items() if v}


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


# The chain holding one rule per AP slot address: the only part of the ruleset that changes
# while sdnsup runs (when a slot is taken or freed), replaced on its own.
PINS_CHAIN = "pins"
# Chain setting the packet mark of a connection pinned to slot n (0: not yet pinned).
MARK_CHAIN = "mark_{}"
# Chain setting the packet mark of sdnsup's own path probes (sdnsup.paths).
PROBE_CHAIN = "mark_probe"

_CT_MARK = {"ct": {"key": "mark"}}
_META_MARK = {"meta": {"key": "mark"}}


def _masked(key: dict[str, Any], mask: int) -> dict[str, Any]:
    # nft prints "x & 0xffffffff" as plain "x"; mirror it so the read-back compares equal.
    return key if mask == 0xFFFFFFFF else {"&": [key, mask]}


def _set_value(key: dict[str, Any], mask: int, value: int) -> dict[str, Any]:
    """``key`` = ``key & ~mask | value``: only the bits of ``mask`` change.

    nft stores the AND narrowed to the bits the OR does not set anyway, and drops an all-ones
    AND: mirror that so the read-back compares equal.
    """
    keep = _u32(~(mask & ~value))
    inner = key if keep == 0xFFFFFFFF else {"&": [key, keep]}
    return {"mangle": {"key": key, "value": {"|": [inner, value]} if value else inner}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _nexthop(proto: str) -> dict[str, Any]:
    return {"rt": {"key": "nexthop", "family": proto}}


def pin_rules(settings: Settings, pins: Iterable[tuple[Any, int]]) -> list[list[dict[str, Any]]]:
    """The rules of :data:`PINS_CHAIN`: a new connection whose first packet was routed to an
    AP slot's address is pinned to that slot (``pins``: (AP address, slot number))."""
    rules = []
    for addr, slot in sorted(pins, key=lambda p: (p[1], p[0].version)):
        proto = "ip" if addr.version == 4 else "ip6"
        rules.append(
            [
                _match(_nexthop(proto), str(addr)),
                _set_value(_CT_MARK, settings.mask, settings.slot_mark(slot)),
            ]
        )
    return rules


def ruleset_objects(
    settings: Settings, shards: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """The table's sets, chains and rules, element-free, in ``nft -j list`` form.

    ``shards``: logical destination set -> number of kernel sets (absent: 1). The rules of
    :data:`PINS_CHAIN` are not part of it (see :func:`pin_rules`).
    """
    shards = shards or {}
    flag, mask = settings.mark, settings.mask
    ct_flag = _masked(_CT_MARK, flag)

    def daddr_in(proto: str, set_name: str) -> dict[str, Any]:
        return _match({"payload": {"protocol": proto, "field": "daddr"}}, f"@{set_name}")

    ct_new = _match({"ct": {"key": "state"}}, "new", "in")
    # Conntrack adopts a TCP connection it did not see open (no conntrack user existed yet:
    # before sdnsup's table, or between `nft flush ruleset` and the heal) as NEW on its next
    # packet, which may be this host's reply on an inbound connection (an SSH session from a
    # host in the CIDRs). Only a SYN opens a TCP connection sdnsup steers; for other
    # protocols the match is false (nft adds "meta l4proto tcp" to it).
    tcp_not_syn = _match(
        {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "syn", "!="
    )
    ct_not_new = _match({"ct": {"key": "state"}}, "new", "!=")
    slots = range(settings.slots + 1)
    # A steered packet's route follows the slot its connection is pinned to: the packet mark
    # carries the slot (policy rules send a draining slot's marks to its own table), set from
    # the conntrack mark by one map lookup. nft 1.0.6 cannot copy masked bits from the ct
    # mark to the packet mark in one statement, hence a tiny chain per slot.
    probe = settings.probe_mark
    targets = {settings.slot_mark(n): MARK_CHAIN.format(n) for n in slots}
    targets[probe] = PROBE_CHAIN
    restore = {
        "vmap": {
            "key": _masked(_CT_MARK, mask),
            "data": {
                "set": [[value, {"goto": {"target": targets[value]}}] for value in sorted(targets)]
            },
        }
    }
    pending = settings.slot_mark(0)
    # Every packet of the host passes these chains; most belong to established connections
    # sdnsup does not steer, and the first rule lets them go after two conntrack lookups.
    # Steered packets (established, or a retransmitted SYN already pinned) get their mark
    # from the map right after the exempt check and leave (goto), skipping the NEW rules.
    # Path probes (sdnsup.paths) leave through another AP than the active one, or by the
    # normal route: their socket carries the probe or the bypass mark, which the NEW rules
    # must not overwrite; a probe's replies get its mark back (so that strict rp_filter
    # finds their way in the probe table), the bypass probe's take the normal route.
    probe_new = [
        ct_new,
        _match(_masked(_META_MARK, mask), probe),
        _set_value(_CT_MARK, mask, probe),
        {"return": None},
    ]
    bypass_new = [ct_new, _match(_masked(_META_MARK, mask), settings.bypass_mark), {"return": None}]
    steer: list[list[dict[str, Any]]] = [
        [ct_not_new, _match(_masked(_CT_MARK, mask), 0), {"return": None}],
        [daddr_in("ip", "exempt4"), {"return": None}],
        [daddr_in("ip6", "exempt6"), {"return": None}],
        [restore],
        [ct_new, tcp_not_syn, {"return": None}],
        probe_new,
        bypass_new,
        *(
            [
                ct_new,
                daddr_in(proto, kernel_set),
                _set_value(_CT_MARK, mask, pending),
                _set_value(_META_MARK, mask, pending),
            ]
            for proto, name in (("ip", "dst4"), ("ip6", "dst6"))
            for kernel_set in shard_names(name, shards.get(name, 1))
        ),
    ]
    clear_inbound = [[ct_new, _match(ct_flag, flag), _set_value(_CT_MARK, mask, 0)]]
    # After the routing decision, a new steered connection is pinned to the AP slot whose
    # address its packet was routed to (the CIDR routes lead to the active AP): the pin is
    # what the kernel did, never a guess made before routing. Only the original direction
    # counts (a reply to a container is routed to the container). A connection routed
    # elsewhere (no AP: the normal route) keeps that route for life; one routed to an AP
    # without a slot yet stays unpinned and is pinned by its next packet.
    pinning = [
        [_match(_masked(_CT_MARK, mask), pending, "!="), {"return": None}],
        [_match({"ct": {"key": "direction"}}, "reply"), {"return": None}],
        [{"jump": {"target": PINS_CHAIN}}],
        *(
            [
                _match(_masked(_CT_MARK, mask), pending),
                _match(_nexthop(proto), f"@exempt{version}", "!="),
                _set_value(_CT_MARK, mask, 0),
            ]
            for proto, version in (("ip", 4), ("ip6", 6))
        ),
    ]
    # The exempt sets hold every AP's address, so "next hop in @exempt" means "leaving
    # through an AP" (and not the normal route, as when no AP is usable). "fib saddr . oif
    # type != local" is true when the source is not an address of the outgoing interface.
    masquerade = [
        [
            _match(_masked(_META_MARK, flag), flag),
            _match(_nexthop(proto), f"@exempt{version}"),
            _match({"fib": {"result": "type", "flags": ["saddr", "oif"]}}, "local", "!="),
            {"masquerade": None},
        ]
        for proto, version in (("ip", 4), ("ip6", 6))
    ]
    # Priorities: mangle (-150) runs before conntrack NAT and the routing decision, which is
    # what lets the mark choose the route; in postrouting it runs before any NAT chain (the
    # pin must not depend on which NAT chain of which tool runs first); srcnat (100) is the
    # usual masquerade slot.
    base_chains = [
        ("prerouting", "filter", "prerouting", -150, steer),
        ("input", "filter", "input", -150, clear_inbound),
        ("output", "route", "output", -150, steer),
        ("pinning", "filter", "postrouting", -150, pinning),
        ("postrouting", "nat", "postrouting", 100, masquerade),
    ]
    objects: list[dict[str, Any]] = [
        {"set": {"name": kernel_set, "type": kind, "flags": ["interval"]}}
        for name, (kind, _) in ADDRESS_SETS.items()
        for kernel_set in shard_names(name, shards.get(name, 1))
    ]
    # nft lists every chain before the first rule, in the order they were created; keep that
    # order so listings compare equal. Regular chains first: base chains jump to them.
    regular = [(MARK_CHAIN.format(n), [[_set_value(_META_MARK, mask, settings.slot_mark(n))]])
               for n in slots]  # fmt: skip
    regular += [(PROBE_CHAIN, [[_set_value(_META_MARK, mask, probe)]]), (PINS_CHAIN, [])]
    for name, _ in regular:
        objects.append({"chain": {"name": name}})
    for name, kind, hook, prio, _ in base_chains:
        objects.append(
            {"chain": {"name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}
        )
    for name, rules in regular + [(c[0], c[4]) for c in base_chains]:
        objects.extend({"rule": {"chain": name, "expr": expr}} for expr in rules)
    return objects


def canonical(objects: Iterable[Any]) -> str:
    return json.dumps(list(objects), sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=8)
def _ruleset_text(settings: Settings, shards: tuple[tuple[str, int], ...]) -> str:
    # Rendering and serialising the ruleset takes about 1 ms: a tenth of the budget of a
    # one-CIDR change, for a text that only changes with the settings or the shard counts.
    return canonical(ruleset_objects(settings, dict(shards)))


def render_table(
    settings: Settings,
    elements: Mapping[str, frozenset[Element]],
    pins: Iterable[tuple[Any, int]] = (),
) -> NftTable:
    """The desired table for ``settings`` holding ``elements`` (set name -> contents), pinning
    new connections by ``pins`` ((AP address, slot number))."""
    shards = {name: k for name in SHARDED if (k := shard_count(len(elements.get(name, ())))) > 1}
    return NftTable(
        name=settings.nft_table,
        ruleset=_ruleset_text(settings, tuple(sorted(shards.items()))),
        elements={k: frozenset(v) for k, v in elements.items() if v},
        shards=shards,
        pins=canonical(pin_rules(settings, pins)),
    )


def element_json(elem: Element) -> Any:
    return {"prefix": {"addr": str(elem.network_address), "len": elem.prefixlen}}


def parse_element(value: Any) -> list[Element]:
    """One element of ``nft -j`` output back into networks."""
    if isinstance(value, dict) and "elem" in value:  # elements with timeouts/counters
        value = value["elem"]["val"]
    if isinstance(value, dict) and "prefix" in value:
        p = value["prefix"]
        return [ipaddress.ip_network(f"{p['addr']}/{p['len']}")]
    if isinstance(value, dict) and "range" in value:
        lo, hi = (ipaddress.ip_address(a) for a in value["range"])
        return list(ipaddress.summarize_address_range(lo, hi))
    if isinstance(value, str):
        return [ipaddress.ip_network(value)]
    raise NftError(f"unexpected set element in nft output: {value!r}")


def table_commands(table: NftTable) -> list[dict[str, Any]]:
    """JSON commands that atomically replace (or create) ``table``.

    ``add table`` before ``delete table`` makes the delete valid whether or not the table
    exists, and the whole list runs as one kernel transaction: there is never a moment with
    half a table.
    """
    tbl = {"family": FAMILY, "name": table.name}
    cmds: list[dict[str, Any]] = [{"add": {"table": tbl}}, {"delete": {"table": tbl}}]
    cmds.append({"add": {"table": tbl}})
    kernel_sets = table.kernel_sets()
    for obj in json.loads(table.ruleset):
        kind, body = next(iter(obj.items()))
        body = {"family": FAMILY, "table": table.name, **body}
        if kind == "set" and kernel_sets.get(body["name"]):
            body["elem"] = [element_json(e) for e in sorted(kernel_sets[body["name"]], key=str)]
        cmds.append({"add": {kind: body}})
    cmds.extend(_pin_commands(table))
    return cmds


def _pin_commands(table: NftTable) -> list[dict[str, Any]]:
    return [
        {"add": {"rule": {"family": FAMILY, "table": table.name, "chain": PINS_CHAIN, "expr": e}}}
        for e in json.loads(table.pins)
    ]


def pins_commands(table: NftTable) -> list[dict[str, Any]]:
    """JSON commands that replace the rules of :data:`PINS_CHAIN` in one transaction.

    Unlike element commands, these make libnftables read no set element (measured: 3 ms
    with 100k CIDRs loaded, against 0.6 s for one element).
    """
    chain = {"family": FAMILY, "table": table.name, "name": PINS_CHAIN}
    return [{"flush": {"chain": chain}}, *_pin_commands(table)]


class NftBackend(Protocol):
    """The seam to nftables. Every write is one kernel transaction; failures raise NftError."""

    def read(
        self, name: str, *, elements: bool = True, known: KnownNetworks = NO_KNOWN_NETWORKS
    ) -> NftTable | None:
        """The table as the kernel has it, or None if there is none.

        ``elements=False`` skips reading set contents (seconds for 100k CIDRs) when only
        the ruleset or the table's presence matters, as in teardown. Elements are
        ``known``'s network objects where it has them.
        """
        ...

    def replace(self, table: NftTable) -> None:
        """Atomically replace (or create) the whole table, elements included."""
        ...

    def create(self, table: NftTable) -> None:
        """Create the table where there is none (an existing one is replaced): the ruleset
        with empty sets in one transaction, then the elements in one more.

        Not atomic, and need not be: before the elements land, nothing is steered, as before
        the table existed.
        """
        ...

    def update_elements(
        self,
        table: NftTable,
        changes: Mapping[str, tuple[frozenset[Element], frozenset[Element]]],
    ) -> None:
        """Add and delete elements of ``table`` (as the kernel has it now) in one transaction:
        ``{logical set name: (to_add, to_delete)}``."""
        ...

    def replace_pins(self, table: NftTable) -> None:
        """Replace the rules of :data:`PINS_CHAIN` by ``table.pins`` in one transaction."""
        ...

    def delete(self, name: str) -> bool:
        """Delete the table; False if it was not there."""
        ...

    @property
    def commits(self) -> int:
        """How many transactions this backend has committed (each moves the generation)."""
        ...

    def generation(self) -> int:
        """The ruleset's generation id, which every committed transaction (anyone's) moves
        by one: with :attr:`commits`, it tells whether another process changed nftables."""
        ...


def table_from_listing(name: str, listing: list[dict[str, Any]]) -> NftTable:
    """Turn ``nft -j list table`` output into an :class:`NftTable`."""
    objects: list[dict[str, Any]] = []
    pins: list[Any] = []
    elements: dict[str, frozenset[Element]] = {}
    drop = {"family", "table", "handle"}
    for obj in listing:
        kind, body = next(iter(obj.items()))
        if kind not in ("set", "chain", "rule"):
            continue
        if kind == "set":
            elems = body.get("elem", [])
            found = [e for value in elems for e in parse_element(value)]
            if found:
                elements[body["name"]] = frozenset(found)
            body = {k: v for k, v in body.items() if k not in drop and k != "elem"}
        elif kind == "chain":
            body = {k: v for k, v in body.items() if k not in drop}
        else:
            if body["chain"] == PINS_CHAIN:
                pins.append(body["expr"])
                continue
            body = {"chain": body["chain"], "expr": body["expr"]}
        objects.append({kind: body})
    table = NftTable(name=name, ruleset=canonical(objects), pins=canonical(pins))
    return merge_shards(table, elements)


def _logical_name(kernel_set: str) -> str:
    """``dst4_3`` -> ``dst4``; any other name is its own logical set."""
    base, _, index = kernel_set.rpartition("_")
    return base if base in SHARDED and index.isdigit() else kernel_set


def merge_shards(table: NftTable, kernel_sets: Mapping[str, frozenset[Element]]) -> NftTable:
    """``table`` with the contents of its kernel sets (shards merged into logical sets).

    A CIDR found in another shard than the one :func:`shard_of` picks (someone added it by
    hand, or a different Python hashed it) would escape element deltas, so the table is then
    given a ruleset that matches nothing sdnsup renders: the next apply reloads it whole.
    """
    declared = {o["set"]["name"] for o in json.loads(table.ruleset) if "set" in o} | set(
        kernel_sets
    )
    shards: dict[str, int] = {}
    for name in SHARDED:
        k = sum(1 for d in declared if d != name and _logical_name(d) == name)
        if k > 1:
            shards[name] = k
    merged: dict[str, set[Element]] = {}
    misplaced = False
    for kernel_set, elems in kernel_sets.items():
        name = _logical_name(kernel_set)
        if name in shards:
            index = int(kernel_set.rpartition("_")[2])
            misplaced |= any(shard_of(e, shards[name]) != index for e in elems)
        merged.setdefault(name, set()).update(elems)
    ruleset = table.ruleset + (" (elements in the wrong shard)" if misplaced else "")
    return NftTable(
        name=table.name,
        ruleset=ruleset,
        elements={k: frozenset(v) for k, v in merged.items() if v},
        shards=shards,
        pins=table.pins,
    )


class LibNftables:
    """:class:`NftBackend`: the ruleset through libnftables JSON, set elements through nfnetlink.

    libnftables 1.0.6 loads every set element into its cache before most commands: with 100k
    CIDRs, listing tables or adding one element costs 1.5-2.5 s. Two commands escape that with
    terse output: ``list ruleset`` (about 1 ms) and ``delete table``. So the ruleset is read and
    deleted that way, whole-table loads stay one libnftables transaction (atomic, elements
    included), and element deltas and reads go through :class:`sdnsup.nfnl.SetElements`.
    """

    def __init__(self) -> None:
        try:
            import nftables
        except (ImportError, OSError) as exc:
            raise NftError(
                "the libnftables Python binding is missing: apt install libnftables1 and "
                f"pip install pip-nftables ({exc})"
            ) from exc
        from sdnsup.nfnl import SetElements

        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._nft.set_terse_output(True)
        # libnftables opens its netlink socket at its first command. Open it now, so that
        # the change monitor knows its port before the first write and has the kernel drop
        # that write's echoes (about 13 MiB at 100k CIDRs; sdnsup.netmon.nfnl_filter).
        self._run([{"list": {"tables": {"family": FAMILY}}}], "list the inet tables")
        self._elements = SetElements()
        self._commits = 0

    @property
    def commits(self) -> int:
        return self._commits

    def generation(self) -> int:
        return self._elements.generation()

    def close(self) -> None:
        self._elements.close()

    def _run(self, cmds: list[dict[str, Any]], what: str) -> Any:
        rc, output, error = self._nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise NftError(f"nftables refused to {what}: {str(error).strip()}")
        return output

    def _listing(self, name: str) -> list[dict[str, Any]] | None:
        out = self._run([{"list": {"ruleset": {"family": FAMILY}}}], "list the inet ruleset")
        objects = out.get("nftables", [])
        if not any(o.get("table", {}).get("name") == name for o in objects):
            return None
        return [o for o in objects if next(iter(o.values())).get("table") == name]

    def read(
        self, name: str, *, elements: bool = True, known: KnownNetworks = NO_KNOWN_NETWORKS
    ) -> NftTable | None:
        listing = self._listing(name)
        if listing is None:
            return None
        table = table_from_listing(name, listing)
        if not elements:
            return table
        found: dict[str, frozenset[Element]] = {}
        for o in listing:
            kernel_set = o.get("set", {}).get("name", "")
            logical = _logical_name(kernel_set)
            if logical in ADDRESS_SETS:
                members = self._elements.list(name, kernel_set, ADDRESS_SETS[logical][1], known)
                if members:
                    found[kernel_set] = frozenset(members)
        return merge_shards(table, found)

    def _load(self, table: NftTable) -> None:
        self._run(table_commands(table), f"load table {FAMILY} {table.name}")
        self._commits += 1

    def replace(self, table: NftTable) -> None:
        self._load(table)
        # libnftables keeps what it loaded in its cache until its next command: 68 MB for
        # 100k elements, for the life of an idle daemon. This listing (terse, ~1 ms) drops it.
        self._listing(table.name)

    def create(self, table: NftTable) -> None:
        # Elements through nfnetlink, not libnftables: measured at 100k CIDRs, 0.55 s and
        # +14 MB at the peak against 1.3-1.6 s and +167 MB (libnftables turns each JSON
        # element into several objects of its own before it sends anything). With empty sets
        # libnftables caches nothing worth dropping.
        self._load(dataclasses.replace(table, elements={}))
        adds = {name: (elems, frozenset[Element]()) for name, elems in table.elements.items()}
        if adds:
            self.update_elements(table, adds)

    def replace_pins(self, table: NftTable) -> None:
        self._run(pins_commands(table), f"replace chain {FAMILY} {table.name} {PINS_CHAIN}")
        self._commits += 1

    def update_elements(
        self,
        table: NftTable,
        changes: Mapping[str, tuple[frozenset[Element], frozenset[Element]]],
    ) -> None:
        from sdnsup.nfnl import Change

        kernel: dict[str, Change] = {}
        for name, (add, delete) in changes.items():
            k, version = table.shards.get(name, 1), ADDRESS_SETS[name][1]
            adds, deletes = split_elements(name, k, add), split_elements(name, k, delete)
            for kernel_set in shard_names(name, k):
                a, d = adds.get(kernel_set, ()), deletes.get(kernel_set, ())
                if a or d:
                    kernel[kernel_set] = Change(version, add=tuple(a), delete=tuple(d))
        if kernel:
            self._elements.update(table.name, kernel)
            self._commits += 1

    def delete(self, name: str) -> bool:
        if self._listing(name) is None:
            return False
        self._run([{"delete": {"table": {"family": FAMILY, "name": name}}}], f"delete {name}")
        self._commits += 1
        return True
