"""Fake kernel backends: they keep state like the kernel does, count writes, print as text."""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence

from sdnsup.nft import Element, NftTable
from sdnsup.routes import Failure, Foreign, IPAddress, Link, Nexthop, Route, Rule


class FakeRoutes:
    """A RoutesBackend with kernel semantics that matter to sdnsup.

    Routes need an existing nexthop; deleting a nexthop deletes its routes; adding a route
    replaces one with the same (dst, table); rules are a set (no duplicates).
    """

    def __init__(self, links: Mapping[str, Link] | None = None) -> None:
        self.nh: dict[int, tuple[Nexthop, int]] = {}
        self.rt: dict[tuple[object, int], tuple[Route, int]] = {}
        self.ru: dict[Rule, int] = {}
        # address (as str) -> link; anything else is unreachable
        self.links = dict(links or {})
        self.writes = 0
        self.calls: list[str] = []
        self.fail_routes: set[object] = set()

    # reads
    def routes(self, proto: int, known: object = None) -> set[Route]:
        return {r for r, p in self.rt.values() if p == proto}

    def nexthops(self, proto: int) -> set[Nexthop]:
        return {n for n, p in self.nh.values() if p == proto}

    def foreign_nexthops(self, proto: int) -> set[int]:
        return {n.id for n, p in self.nh.values() if p != proto}

    def rules(self, proto: int) -> set[Rule]:
        return {r for r, p in self.ru.items() if p == proto}

    def foreign_objects(
        self,
        proto: int,
        *,
        tables: Collection[int],
        priorities: Collection[int],
        nhids: Collection[int],
        routes: Mapping[int, Collection[object]],
    ) -> list[Foreign]:
        found = [
            Foreign(f"rule priority {r.priority} lookup {r.table} (proto {p})")
            for r, p in self.ru.items()
            if p != proto and (r.priority in priorities or r.table in tables)
        ]
        found += [
            Foreign(f"route {r.dst} in table {r.table} (proto {p})", route=(r.table, r.dst))
            for r, p in self.rt.values()
            if p != proto and r.dst in routes.get(r.table, ())
        ]
        found += [
            Foreign(f"nexthop id {n.id:#x} (proto {p})", nhid=n.id)
            for n, p in self.nh.values()
            if p != proto and n.id in nhids
        ]
        return found

    def resolve(self, addr: IPAddress) -> Link | None:
        return self.links.get(str(addr))

    # writes
    def add_routes(self, routes: Sequence[Route], proto: int) -> list[Failure]:
        self.calls.append(f"add_routes {len(routes)}")
        failures = []
        for r in routes:
            if r.dst in self.fail_routes or r.nhid not in self.nh:
                failures.append(Failure(r, OSError(errno.EINVAL, "Invalid argument")))
                continue
            self.rt[(r.dst, r.table)] = (r, proto)
            self.writes += 1
        return failures

    def delete_routes(self, routes: Sequence[Route], *, proto: int | None = None) -> list[Failure]:
        self.calls.append(f"delete_routes {len(routes)}")
        for r in routes:
            have = self.rt.get((r.dst, r.table))
            if have is not None and have[0] == r and proto in (None, have[1]):
                del self.rt[(r.dst, r.table)]
                self.writes += 1
        return []

    def replace_nexthop(self, nexthop: Nexthop, proto: int) -> list[Failure]:
        self.calls.append(f"replace_nexthop {nexthop.id}")
        self.nh[nexthop.id] = (nexthop, proto)
        self.writes += 1
        return []

    def delete_nexthops(self, ids: Iterable[int]) -> list[Failure]:
        ids = list(ids)
        self.calls.append(f"delete_nexthops {len(ids)}")
        for i in ids:
            if self.nh.pop(i, None) is not None:
                self.writes += 1
                self.rt = {k: v for k, v in self.rt.items() if v[0].nhid != i}
        return []

    def add_rules(self, rules: Sequence[Rule], proto: int) -> list[Failure]:
        self.calls.append(f"add_rules {len(rules)}")
        for r in rules:
            if r not in self.ru:
                self.ru[r] = proto
                self.writes += 1
        return []

    def delete_rules(self, rules: Sequence[Rule], *, proto: int | None = None) -> list[Failure]:
        self.calls.append(f"delete_rules {len(rules)}")
        for r in rules:
            if r in self.ru and proto in (None, self.ru[r]):
                del self.ru[r]
                self.writes += 1
        return []

    def dump(self) -> str:
        lines = [
            f"nexthop {n.id:#x} {n.gateway or 'blackhole'} if{n.ifindex} proto {p}"
            for n, p in sorted(self.nh.values(), key=lambda v: v[0].id)
        ]
        lines += [
            f"route {r.dst} table {r.table} nhid {r.nhid:#x} proto {p}"
            for r, p in sorted(self.rt.values(), key=lambda v: (str(v[0].dst), v[0].table))
        ]
        lines += [
            f"rule fam{r.family} prio {r.priority} fwmark {r.fwmark:#x}/{r.fwmask:#x} "
            + (f"iif {r.iifname} " if r.iifname else "")
            + f"lookup {r.table} proto {p}"
            for r, p in sorted(self.ru.items())
        ]
        return "\n".join(lines)


class FakeNft:
    """An NftBackend holding tables in memory; counts transactions and element writes."""

    def __init__(self) -> None:
        self.tables: dict[str, NftTable] = {}
        self.transactions = 0
        self.element_writes = 0
        self.others = 0  # transactions other processes committed (tests raise it)
        self.calls: list[str] = []  # whole-table writes: "create" or "replace"

    @property
    def commits(self) -> int:
        return self.transactions

    def generation(self) -> int:
        return self.transactions + self.others

    def read(self, name: str, *, elements: bool = True, known: object = None) -> NftTable | None:
        table = self.tables.get(name)
        if table is None or elements:
            return table
        return NftTable(table.name, table.ruleset, {}, table.shards, table.pins)

    def replace(self, table: NftTable) -> None:
        self.calls.append("replace")
        self.tables[table.name] = table
        self.transactions += 1
        self.element_writes += sum(len(v) for v in table.elements.values())

    def create(self, table: NftTable) -> None:
        self.calls.append("create")
        self.tables[table.name] = NftTable(table.name, table.ruleset, {}, table.shards, table.pins)
        self.transactions += 1
        adds = {name: (elems, frozenset[Element]()) for name, elems in table.elements.items()}
        if adds:
            self.update_elements(table, adds)

    def update_elements(
        self,
        table: NftTable,
        changes: Mapping[str, tuple[frozenset[Element], frozenset[Element]]],
    ) -> None:
        name = table.name
        t = self.tables[name]
        elements = dict(t.elements)
        for set_name, (add, delete) in changes.items():
            elements[set_name] = (elements.get(set_name, frozenset()) - delete) | add
            self.element_writes += len(add) + len(delete)
        self.tables[name] = NftTable(
            t.name, t.ruleset, {k: v for k, v in elements.items() if v}, t.shards, t.pins
        )
        self.transactions += 1

    def replace_pins(self, table: NftTable) -> None:
        t = self.tables[table.name]
        self.tables[table.name] = NftTable(t.name, t.ruleset, t.elements, t.shards, table.pins)
        self.transactions += 1

    def delete(self, name: str) -> bool:
        self.transactions += 1
        return self.tables.pop(name, None) is not None


class FakeSysctl:
    def __init__(self, values: Mapping[str, int] | None = None) -> None:
        self.values = dict(values or {})
        self.writes = 0

    def read(self, key: str) -> int | None:
        return self.values.get(key)

    def write(self, key: str, value: int) -> None:
        self.values[key] = value
        self.writes += 1


def link(ifindex: int, ifname: str, gateway: str | None = None) -> Link:
    gw = ipaddress.ip_address(gateway) if gateway else None
    return Link(ifindex=ifindex, ifname=ifname, gateway=gw, prefsrc=None)


class FakeConntrack:
    """A ConntrackBackend: entries with marks, sockets that exist or not, calls recorded."""

    def __init__(self) -> None:
        from sdnsup.conntrack import Entry

        self.entries: list[Entry] = []
        self.sockets: set[Entry] = set()  # entries that have a local socket
        self.aborted: list[Entry] = []
        self.calls: list[str] = []

    def add(
        self,
        mark: int,
        *,
        port: int,
        local: bool = True,
        tcp_state: int | None = 3,
        dst: str = "10.10.10.1",
        replied: bool = True,
    ) -> None:
        import socket

        from sdnsup.conntrack import Entry

        entry = Entry(
            socket.AF_INET,
            socket.IPPROTO_TCP,
            ipaddress.IPv4Address("172.31.1.2" if local else "10.88.0.2"),
            ipaddress.IPv4Address(dst),
            port,
            8080,
            mark,
            tcp_state,
            replied=replied,
        )
        self.entries.append(entry)
        if local:
            self.sockets.add(entry)

    def pinned(self, value: int, mask: int) -> list:  # type: ignore[type-arg]
        self.calls.append(f"pinned {value:#x}")
        return [e for e in self.entries if e.mark & mask == value]

    def unanswered(self, value: int, mask: int) -> list:  # type: ignore[type-arg]
        self.calls.append(f"unanswered {value:#x}")
        return [e for e in self.entries if e.mark & mask == value and not e.replied]

    def repin(self, entries, value: int, mask: int) -> int:  # type: ignore[no-untyped-def]
        from dataclasses import replace

        moved = 0
        keys = {(e.src, e.sport) for e in entries}
        for i, e in enumerate(self.entries):
            if (e.src, e.sport) in keys:
                self.entries[i] = replace(e, mark=e.mark & ~mask | value)
                moved += 1
        self.calls.append(f"repin {moved} -> {value:#x}")
        return moved

    def abort_sockets(self, entries) -> int:  # type: ignore[no-untyped-def]
        done = [e for e in entries if e in self.sockets and e.live]
        self.aborted += done
        self.sockets -= set(done)
        self.calls.append(f"abort {len(done)}")
        return len(done)
