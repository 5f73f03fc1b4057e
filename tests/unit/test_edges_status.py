"""Edges folded from both sides' reports, and the status tables."""

from __future__ import annotations

from meshshield.cas.edges import fold_edges
from meshshield.status import EDGE_HEADERS, connection_rows, edge_rows, table

FE = "spiffe://m/shop/web"
BE = "spiffe://m/shop/api"


def conn(direction: str, peer: str, **kw: object) -> dict[str, object]:
    return {"direction": direction, "peer_spiffe_id": peer, "platform": "sim",
            "opened_at": "2026-01-01T00:00:00Z", "bytes_in": 10, "bytes_out": 5, **kw}


def test_one_edge_per_connection_even_when_both_sides_report() -> None:
    edges = fold_edges([(BE, [conn("inbound", FE), conn("inbound", FE)]),
                        (FE, [conn("outbound", BE), conn("outbound", BE)])])
    assert len(edges) == 1
    e = edges[0]
    assert (e["src"], e["dst"], e["attested"], e["connections"], e["bytes"]) == (
        FE, BE, True, 2, 30)


def test_client_side_only_and_refusals_stay_separate() -> None:
    edges = fold_edges([(FE, [conn("outbound", BE)]),
                        (BE, [conn("inbound", "spiffe://m/shop/rogue", reason="peer_not_allowed")]),
                        (BE, [{"direction": "sideways"}, {"peer_spiffe_id": 3}])])
    assert {(e["src"], e["attested"]) for e in edges} == {
        (FE, True), ("spiffe://m/shop/rogue", "peer_not_allowed")}


def test_tables_render() -> None:
    rows = edge_rows({"edges": fold_edges([(BE, [conn("inbound", FE)])])})
    text = table(EDGE_HEADERS, rows)
    assert "√" in text and FE in text and "15B" in text
    crow = connection_rows({"connections": [conn("inbound", FE, measurement="ab" * 32,
                                                 simulated=True)]}, now=1.9e9)
    assert crow[0][3] == "abababababab…" and crow[0][4] == "yes"


def test_a_report_keeps_only_connections_its_reporter_can_vouch_for() -> None:
    from meshshield.cas.edges import own_connections

    issued = {"a1": FE, "b1": BE, "r1": "spiffe://m/shop/rogue"}
    allowed = {(("shop", "api"), ("shop", "web"))}  # web may connect to api
    conns = [
        conn("inbound", FE, cert_serial="a1"),                      # kept: allowed, issued
        conn("inbound", FE, cert_serial="zz"),                      # never issued
        conn("inbound", FE, cert_serial="b1"),                      # issued to someone else
        conn("inbound", "spiffe://m/shop/rogue", cert_serial="r1"),  # policy does not allow
        conn("outbound", FE, cert_serial="a1"),                     # api -> web not allowed
        conn("inbound", BE, cert_serial="b1"),                      # itself
        conn("inbound", "spiffe://other/shop/web", cert_serial="a1"),  # other trust domain
        conn("inbound", "spiffe://m/shop/rogue", reason="peer_not_allowed"),  # kept: refusal
        conn("inbound", BE, reason="peer_not_allowed"),             # a refusal of itself
        {"direction": "sideways", "peer_spiffe_id": FE},
    ]
    kept = own_connections(("shop", "api"), conns, trust_domain="m",
                           issued_to=issued.get, admits=lambda s, c: (s, c) in allowed)
    assert kept == [conns[0], conns[7]]
