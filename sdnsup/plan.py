"""``sdnsup plan``: what ``run`` would install, for review before deployment (no root needed).

The nftables part is printed in nft syntax (or as the libnftables JSON commands ``run`` sends,
with ``--json``) and loads as-is with ``nft -f``; the routing part is printed as the ``ip``
commands equivalent to the netlink messages ``run`` sends. Both come from the same rendering
the applier uses (:func:`sdnsup.applier.render`), so what is reviewed is what is applied.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from sdnsup.applier import KernelState, render
from sdnsup.defaults import NexthopCompat
from sdnsup.nft import PINS_CHAIN, NftTable, element_json, table_commands
from sdnsup.routes import RTPROT_SDNSUP, IPAddress, Link
from sdnsup.state import DesiredState, slot_of_nhid
from sdnsup.sysctl import NEXTHOP_COMPAT_MODE


def _value(v: Any) -> str:
    if isinstance(v, list):  # flag lists, e.g. ["syn", "ack"]
        return "(" + " | ".join(map(str, v)) + ")"
    return f"0x{v:08x}" if isinstance(v, int) else str(v)


def _expr(e: Any) -> str:
    """One libnftables JSON expression of the forms sdnsup writes, in nft syntax."""
    if not isinstance(e, dict):
        return _value(e)
    ((kind, body),) = e.items()
    if kind == "payload":
        return f"{body['protocol']} {body['field']}"
    if kind in ("ct", "meta"):
        return f"{kind} {body['key']}"
    if kind == "rt":
        return f"rt {body['family']} {body['key']}"
    if kind == "fib":
        return f"fib {' . '.join(body['flags'])} {body['result']}"
    if kind in ("&", "|"):
        left, right = body
        return f"{_expr(left)} {kind} {_expr(right)}"
    raise ValueError(f"no nft syntax known for expression {e!r}")


def _statement(s: dict[str, Any]) -> str:
    ((kind, body),) = s.items()
    if kind == "match":
        left, right, op = _expr(body["left"]), body["right"], body["op"]
        if op == "in" or (op == "==" and isinstance(right, str) and right.startswith("@")):
            return f"{left} {right}"  # set lookups and "ct state new" read without an operator
        return f"{left} {op} {_expr(right)}"
    if kind == "mangle":
        return f"{_expr(body['key'])} set {_expr(body['value'])}"
    if kind in ("return", "masquerade", "accept", "drop"):
        return kind
    if kind in ("jump", "goto"):
        return f"{kind} {body['target']}"
    if kind == "vmap":
        pairs = ", ".join(f"{_value(k)} : {_statement(v)}" for k, v in body["data"]["set"])
        return f"{_expr(body['key'])} vmap {{ {pairs} }}"
    raise ValueError(f"no nft syntax known for statement {s!r}")


def _element(elem: Any) -> str:
    j = element_json(elem)
    return f"{j['prefix']['addr']}/{j['prefix']['len']}"


def nft_text(table: NftTable) -> str:
    """The table in nft syntax; ``nft -f`` replaces any table of that name with it."""
    objects = json.loads(table.ruleset)
    lines = [
        # add + delete makes the file replace the table whether or not it exists, in one
        # transaction, exactly like run's whole-table load.
        f"table inet {table.name}",
        f"delete table inet {table.name}",
        f"table inet {table.name} {{",
    ]
    for obj in objects:
        if "set" in obj:
            s = obj["set"]
            elems = sorted(table.set(s["name"]), key=lambda n: (n.version, n))
            flags = f" flags {', '.join(s['flags'])};" if s.get("flags") else ""
            body = f"type {s['type']};{flags}"
            if elems:
                body += " elements = { " + ", ".join(_element(e) for e in elems) + " }"
            lines.append(f"\tset {s['name']} {{ {body} }}")
    rules: dict[str, list[str]] = {}
    exprs = [(o["rule"]["chain"], o["rule"]["expr"]) for o in objects if "rule" in o]
    exprs += [(PINS_CHAIN, expr) for expr in json.loads(table.pins)]
    for chain, expr in exprs:
        rules.setdefault(chain, []).append(" ".join(_statement(x) for x in expr))
    for obj in objects:
        if "chain" in obj:
            c = obj["chain"]
            lines.append(f"\tchain {c['name']} {{")
            if "hook" in c:
                lines.append(
                    f"\t\ttype {c['type']} hook {c['hook']} priority {c['prio']}; "
                    f"policy {c['policy']};"
                )
            lines.extend(f"\t\t{rule}" for rule in rules.get(c["name"], []))
            lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def ip_commands(
    state: KernelState,
    links: dict[int, Link],
    nexthop_compat: NexthopCompat = "auto",
    slot_links: dict[tuple[int, int], Link] | None = None,
) -> list[str]:
    """The ``ip`` commands equivalent to the netlink messages run sends for ``state``.

    ``links``: IP version -> the active AP's link; ``slot_links``: (version, slot) -> link.
    """
    out = []
    for nh in sorted(state.nexthops, key=lambda n: n.id):
        fam = "-4" if nh.family == socket.AF_INET else "-6"
        if nh.gateway is None:
            where = "blackhole"
        else:
            version, slot = slot_of_nhid(nh.id) or (4 if nh.family == socket.AF_INET else 6, 0)
            link = (slot_links or {}).get((version, slot)) if slot else links.get(version)
            where = f"via {nh.gateway} dev {link.ifname if link else '<interface to the AP>'}"
        out.append(f"ip {fam} nexthop replace id {nh.id} {where} proto {RTPROT_SDNSUP}")
    for (table, nhid), dsts in sorted(state.routes.items()):
        for dst in sorted(dsts, key=lambda n: (n.version, n)):
            out.append(f"ip route replace {dst} nhid {nhid} table {table} proto {RTPROT_SDNSUP}")
    for rule in sorted(state.rules):
        fam = "-4" if rule.family == socket.AF_INET else "-6"
        iif = f" iif {rule.iifname}" if rule.iifname else ""
        out.append(
            f"ip {fam} rule add fwmark {rule.fwmark:#x}/{rule.fwmask:#x}{iif} lookup "
            f"{rule.table} priority {rule.priority} proto {RTPROT_SDNSUP}"
        )
    for ifname in sorted(state.valid_mark):
        out.append(f"sysctl -w net.ipv4.conf.{ifname}.src_valid_mark=1")
    if state.routes and nexthop_compat == "auto":
        out.append("# only when no other software has nexthop objects (ip nexthop show):")
        out.append(f"sysctl -w {NEXTHOP_COMPAT_MODE.replace('/', '.')}=0")
    return out


def plan(
    desired: DesiredState,
    resolve: Callable[[IPAddress], Link | None],
    strict_rpf: Callable[[str], bool] = lambda _ifname: False,
    *,
    as_json: bool = False,
    nexthop_compat: NexthopCompat = "auto",
) -> str:
    """Everything ``run`` would install for ``desired``, as text to review.

    Args:
        resolve: finds the interface towards an AP (a real route lookup when possible; a
            lookup that fails leaves a placeholder in the output and a comment why).
        as_json: one JSON document instead of text: ``{"notes": [...], "nftables": [...],
            "commands": [...]}``, the nftables part as the libnftables JSON commands, the
            routing as ip and sysctl commands, and what the text shows as comments as notes.
    """
    state, result = render(desired, resolve, strict_rpf)
    if as_json:
        commands = ip_commands(state, result.ap_links, nexthop_compat, result.slot_links)
        doc = {
            "notes": [*result.problems, *(c[2:] for c in commands if c.startswith("# "))],
            "nftables": table_commands(state.table) if state.table is not None else [],
            "commands": [c for c in commands if not c.startswith("#")],
        }
        return json.dumps(doc, indent=1) + "\n"
    parts = []
    for problem in result.problems:
        parts.append(f"# note: {problem}")
    parts.append("# nftables: load with  nft -f FILE")
    if state.table is None:
        parts.append("# (nothing: no CIDRs)")
    else:
        parts.append(nft_text(state.table).rstrip())
    parts.append("")
    parts.append("# routing: what run does through netlink, as ip commands")
    parts.extend(ip_commands(state, result.ap_links, nexthop_compat, result.slot_links))
    return "\n".join(parts) + "\n"
