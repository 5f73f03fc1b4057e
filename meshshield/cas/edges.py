"""The mesh's edges, folded from the sidecars' connection reports (pure).

Both ends of a connection report it (the server side as inbound, the client side as
outbound), so each edge is taken from one side only: the server's report when there is
one, else the client's. Connections between the same pair with the same outcome fold
into one edge: bytes add up, `since` is the oldest, `connections` counts them.

A report speaks only for its reporter's own connections (`own_connections`): an entry
that claims an attested connection must name a peer certificate the CAS issued to that
peer, and a connection the current policy allows between the reporter and that peer;
the reporter's side of every edge is the identity of its TLS client certificate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshshield.pki.spiffe import parse_spiffe_id

Workload = tuple[str, str]  # (session, service)
MAX_SERIAL = 128


def _num(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _text(v: object) -> str | None:
    return v if isinstance(v, str) else None


def edge_of(reporter: str, c: Mapping[str, Any]) -> dict[str, Any] | None:
    direction = c.get("direction")
    peer = c.get("peer_spiffe_id")
    if direction not in ("inbound", "outbound") or not isinstance(peer, str):
        return None
    src, dst = (peer, reporter) if direction == "inbound" else (reporter, peer)
    reason = c.get("reason")
    return {
        "src": src,
        "dst": dst,
        "side": "server" if direction == "inbound" else "client",
        "platform": _text(c.get("platform")),
        "simulated": bool(c.get("simulated")),
        "attested": True if reason is None else str(reason),
        "since": _text(c.get("opened_at")) or _text(c.get("at")),
        "bytes": _num(c.get("bytes_in")) + _num(c.get("bytes_out")),
    }


def _workload(uri: str, trust_domain: str) -> Workload | None:
    try:
        sid = parse_spiffe_id(uri)
    except ValueError:
        return None
    if sid.trust_domain != trust_domain or len(sid.path_segments) != 2:
        return None
    return sid.path_segments[0], sid.path_segments[1]


def own_connections(
    reporter: Workload,
    conns: Iterable[Mapping[str, Any]],
    *,
    trust_domain: str,
    issued_to: Callable[[str], str | None],
    admits: Callable[[Workload, Workload], bool],
) -> list[Mapping[str, Any]]:
    """The entries of a report that its reporter can vouch for.

    `issued_to(serial)` is the SPIFFE ID of the unrevoked certificate the CAS issued with
    that serial (None if none); `admits(server, client)` whether the current policy lets
    client connect to server. A refusal (an entry with a `reason`) is the reporter's own
    observation and is kept as long as it names a peer other than the reporter."""
    kept = []
    for c in conns:
        direction, peer = c.get("direction"), c.get("peer_spiffe_id")
        if direction not in ("inbound", "outbound") or not isinstance(peer, str):
            continue
        peer_wl = _workload(peer, trust_domain)
        if peer_wl == reporter:
            continue
        if c.get("reason") is not None:
            kept.append(c)
            continue
        serial = c.get("cert_serial")
        if peer_wl is None or not isinstance(serial, str) or len(serial) > MAX_SERIAL:
            continue
        if issued_to(serial.lower()) != peer:
            continue
        server, client = (reporter, peer_wl) if direction == "inbound" else (peer_wl, reporter)
        if admits(server, client):
            kept.append(c)
    return kept


def fold_edges(reports: Iterable[tuple[str, Iterable[Mapping[str, Any]]]]) -> list[dict[str, Any]]:
    """Edges from (reporter SPIFFE ID, its connection summaries) pairs."""
    groups: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for reporter, conns in reports:
        for c in conns:
            e = edge_of(reporter, c)
            if e is None:
                continue
            key = (e["src"], e["dst"], str(e["attested"]), e["side"])
            g = groups.get(key)
            if g is None:
                groups[key] = {**e, "connections": 1}
                continue
            g["bytes"] += e["bytes"]
            g["connections"] += 1
            if e["since"] and (g["since"] is None or e["since"] < g["since"]):
                g["since"] = e["since"]
    out = []
    for (src, dst, attested, side), g in sorted(groups.items()):
        if side == "client" and (src, dst, attested, "server") in groups:
            continue  # the server side reported the same connections
        out.append({k: v for k, v in g.items() if k != "side"})
    return out
