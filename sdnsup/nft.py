"""The ``inet sdnsup`` nftables table: rendered as libnftables JSON, read back, compared.

The table is the seed's connmark rule set, narrowed to the user's destinations by set lookups
and masked so that other users of the packet and conntrack marks keep their bits::

    prerouting (filter, mangle):  exempt -> return; NEW to @dst -> ct mark |= MARK;
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
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

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


@dataclass(frozen=True, slots=True)
class NftTable:
    """The table as sdnsup sees it: its ruleset text and the contents of its sets."""

    name: str
    ruleset: str
    elements: Mapping[str, frozenset[Element]] = field(default_factory=dict)

    def set(self, name: str) -> frozenset[Element]:
        return self.elements.get(name, frozenset())


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


def ruleset_objects(settings: Settings) -> list[dict[str, Any]]:
    """The table's sets, chains and rules, element-free, in ``nft -j list`` form."""
    mark, mask = settings.mark, settings.mask
    ct_mark = {"ct": {"key": "mark"}}
    meta_mark = {"meta": {"key": "mark"}}

    def set_mark(key: dict[str, Any]) -> dict[str, Any]:
        # nft stores "x & ~MASK | MARK" with the AND narrowed to the bits the OR does not set
        # anyway, and drops an all-ones AND: mirror that so the read-back compares equal.
        keep = _u32(~(mask & ~mark))
        inner = key if keep == 0xFFFFFFFF else {"&": [key, keep]}
        return {"mangle": {"key": key, "value": {"|": [inner, mark]}}}

    def has_mark(key: dict[str, Any]) -> dict[str, Any]:
        left = key if mask == 0xFFFFFFFF else {"&": [key, mask]}
        return {"match": {"op": "==", "left": left, "right": mark}}

    def daddr_in(proto: str, set_name: str) -> dict[str, Any]:
        return {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": proto, "field": "daddr"}},
                "right": f"@{set_name}",
            }
        }

    ct_new = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}
    steer = [
        [daddr_in("ip", "exempt4"), {"return": None}],
        [daddr_in("ip6", "exempt6"), {"return": None}],
        [ct_new, daddr_in("ip", "dst4"), set_mark(ct_mark)],
        [ct_new, daddr_in("ip6", "dst6"), set_mark(ct_mark)],
        [has_mark(ct_mark), set_mark(meta_mark)],
    ]
    clear_inbound = [
        [
            ct_new,
            has_mark(ct_mark),
            {"mangle": {"key": ct_mark, "value": {"&": [ct_mark, _u32(~mask)]}}},
        ]
    ]
    # The exempt sets hold every AP's address, so "next hop in @exempt" means "leaving
    # through an AP" (and not the normal route, as when no AP is usable). "fib saddr . oif
    # type != local" is true when the source is not an address of the outgoing interface.
    masquerade = [
        [
            has_mark(meta_mark),
            {
                "match": {
                    "op": "==",
                    "left": {"rt": {"key": "nexthop", "family": proto}},
                    "right": f"@exempt{version}",
                }
            },
            {
                "match": {
                    "op": "!=",
                    "left": {"fib": {"result": "type", "flags": ["saddr", "oif"]}},
                    "right": "local",
                }
            },
            {"masquerade": None},
        ]
        for proto, version in (("ip", 4), ("ip6", 6))
    ]
    # Priorities: mangle (-150) runs before conntrack NAT and the routing decision, which is
    # what lets the mark choose the route; srcnat (100) is the usual masquerade slot.
    chains = [
        ("prerouting", "filter", "prerouting", -150, steer),
        ("input", "filter", "input", -150, clear_inbound),
        ("output", "route", "output", -150, steer),
        ("postrouting", "nat", "postrouting", 100, masquerade),
    ]
    objects: list[dict[str, Any]] = [
        {"set": {"name": name, "type": kind, "flags": ["interval"]}}
        for name, (kind, _) in ADDRESS_SETS.items()
    ]
    # nft lists every chain before the first rule; keep that order so listings compare equal.
    for name, kind, hook, prio, _ in chains:
        objects.append(
            {"chain": {"name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}
        )
    for name, _, _, _, rules in chains:
        objects.extend({"rule": {"chain": name, "expr": expr}} for expr in rules)
    return objects


def canonical(objects: Iterable[dict[str, Any]]) -> str:
    return json.dumps(list(objects), sort_keys=True, separators=(",", ":"))


def render_table(settings: Settings, elements: Mapping[str, frozenset[Element]]) -> NftTable:
    """The desired table for ``settings`` holding ``elements`` (set name -> contents)."""
    return NftTable(
        name=settings.nft_table,
        ruleset=canonical(ruleset_objects(settings)),
        elements={k: frozenset(v) for k, v in elements.items() if v},
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
    for obj in json.loads(table.ruleset):
        kind, body = next(iter(obj.items()))
        body = {"family": FAMILY, "table": table.name, **body}
        if kind == "set" and table.set(body["name"]):
            body["elem"] = [element_json(e) for e in sorted(table.set(body["name"]), key=str)]
        cmds.append({"add": {kind: body}})
    return cmds


def element_commands(
    table: str, changes: Mapping[str, tuple[Iterable[Element], Iterable[Element]]]
) -> list[dict[str, Any]]:
    """JSON commands for element deltas: ``{set: (add, delete)}``. Deletes go first so that
    replacing a CIDR by an overlapping one never trips the kernel's overlap check."""
    cmds: list[dict[str, Any]] = []
    for verb, index in (("delete", 1), ("add", 0)):
        for set_name, delta in sorted(changes.items()):
            elems = [element_json(e) for e in delta[index]]
            if elems:
                cmds.append(
                    {
                        verb: {
                            "element": {
                                "family": FAMILY,
                                "table": table,
                                "name": set_name,
                                "elem": elems,
                            }
                        }
                    }
                )
    return cmds


class NftBackend(Protocol):
    """The seam to nftables. Every write is one kernel transaction; failures raise NftError."""

    def read(self, name: str, *, elements: bool = True) -> NftTable | None:
        """The table as the kernel has it, or None if there is none.

        ``elements=False`` skips reading set contents (seconds for 100k CIDRs) when only
        the ruleset or the table's presence matters, as in teardown.
        """
        ...

    def replace(self, table: NftTable) -> None:
        """Atomically replace (or create) the whole table, elements included."""
        ...

    def update_elements(
        self, name: str, changes: Mapping[str, tuple[frozenset[Element], frozenset[Element]]]
    ) -> None:
        """Add and delete set elements: ``{set_name: (to_add, to_delete)}``."""
        ...

    def delete(self, name: str) -> bool:
        """Delete the table; False if it was not there."""
        ...


def table_from_listing(name: str, listing: list[dict[str, Any]]) -> NftTable:
    """Turn ``nft -j list table`` output into an :class:`NftTable`."""
    objects: list[dict[str, Any]] = []
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
            body = {"chain": body["chain"], "expr": body["expr"]}
        objects.append({kind: body})
    return NftTable(name=name, ruleset=canonical(objects), elements=elements)


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
        self._elements = SetElements()

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

    def read(self, name: str, *, elements: bool = True) -> NftTable | None:
        listing = self._listing(name)
        if listing is None:
            return None
        table = table_from_listing(name, listing)
        if not elements:
            return table
        found: dict[str, frozenset[Element]] = {}
        declared = {o["set"]["name"] for o in listing if "set" in o}
        for set_name, (_, version) in ADDRESS_SETS.items():
            if set_name in declared:
                members = self._elements.list(name, set_name, version)
                if members:
                    found[set_name] = frozenset(members)
        return replace(table, elements=found)

    def replace(self, table: NftTable) -> None:
        self._run(table_commands(table), f"load table {FAMILY} {table.name}")

    def update_elements(
        self, name: str, changes: Mapping[str, tuple[frozenset[Element], frozenset[Element]]]
    ) -> None:
        from sdnsup.nfnl import Change

        self._elements.update(
            name,
            {
                set_name: Change(ADDRESS_SETS[set_name][1], add=tuple(add), delete=tuple(delete))
                for set_name, (add, delete) in changes.items()
            },
        )

    def delete(self, name: str) -> bool:
        if self._listing(name) is None:
            return False
        self._run([{"delete": {"table": {"family": FAMILY, "name": name}}}], f"delete {name}")
        return True
