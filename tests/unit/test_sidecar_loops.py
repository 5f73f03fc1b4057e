"""The sidecar's CAS-facing logic without sockets: the SSE parser (bounded events) and
the validation of an attest answer before any of it is applied."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from meshshield.errors import MeshError, Reason
from meshshield.pki import generate_ca
from meshshield.pki.ca import CaRecord, cert_pem, issue_leaf
from meshshield.pki.keys import generate_p256
from meshshield.sidecar.caslink import SseParser
from meshshield.sidecar.identity import validate_answer

# -- SSE -------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 7, 1000])
def test_sse_events_in_any_chunking(split: int) -> None:
    stream = (b": keep-alive\n\nid: 3\nevent: trust\ndata: {\"a\":\ndata: 1}\n\n"
              b"event: trust\r\ndata: x\r\n\r\n")
    p = SseParser(1024)
    out = []
    for i in range(0, len(stream), split):
        out += p.feed(stream[i:i + split])
    assert out == [("trust", '{"a":\n1}'), ("trust", "x")]


def test_sse_event_larger_than_the_cap_is_an_error_even_without_a_newline() -> None:
    p = SseParser(1000)
    assert p.feed(b"event: trust\ndata: " + b"x" * 900) == []
    with pytest.raises(MeshError) as e:
        p.feed(b"x" * 200)
    assert e.value.reason is Reason.BODY_TOO_LARGE


def test_sse_many_small_events_are_not_one_big_one() -> None:
    p = SseParser(100)
    for _ in range(50):
        assert p.feed(b"data: 0123456789\n\n") == [("message", "0123456789")]


# -- attest answers --------------------------------------------------------------------

NOW = datetime.now(UTC)
CA_CERT, CA_KEY = generate_ca("meshshield.local", NOW - timedelta(days=1))
CA = CaRecord(CA_CERT, CA_KEY, "active")
TRUST = {"epoch": 4, "trust_domain": "meshshield.local", "session": "shop",
         "services": {}, "bundle": cert_pem(CA_CERT)}


def _answer(key: Any, **over: Any) -> dict[str, Any]:
    # Valid around the moment the test runs (not the import: a long run reaches these
    # tests after a certificate made at import time would have expired).
    now = datetime.now(UTC)
    leaf = issue_leaf(CA, key.public_key(), spiffe_id="spiffe://meshshield.local/shop/backend",
                      dns=[], not_before=now - timedelta(minutes=1),
                      not_after=now + timedelta(minutes=10), claims=None)
    base = {"certificate": cert_pem(leaf) + cert_pem(CA_CERT), "bundle": cert_pem(CA_CERT),
            "trust": TRUST, "claims": {"session": "shop"},
            "spiffe_id": "spiffe://meshshield.local/shop/backend"}
    return {**base, **over}


def test_a_whole_good_answer_validates() -> None:
    key = generate_p256()
    a = validate_answer(key, _answer(key))
    assert a.view.epoch == 4 and a.leaf.public_key() == key.public_key()


@pytest.mark.parametrize(("spoil", "message"), [
    (lambda a, k: {**a, "certificate": "-----BEGIN CERTIFICATE-----\nAA==\n-----END "
                   "CERTIFICATE-----\n"}, "not a PEM certificate chain"),
    (lambda a, k: {x: y for x, y in a.items() if x != "certificate"}, "missing certificate"),
    (lambda a, k: _answer(generate_p256()), "not the key this sidecar made"),
    (lambda a, k: {**a, "bundle": cert_pem(generate_ca("meshshield.local", NOW)[0])},
     "not issued by a CA of the answer's bundle"),
    (lambda a, k: {**a, "trust": {"epoch": "x"}}, "trust snapshot is malformed"),
    (lambda a, k: {**a, "trust": []}, "trust snapshot must be an object"),
    (lambda a, k: [a], "expected a JSON object"),
])
def test_a_spoiled_answer_is_refused_whole(spoil: Any, message: str) -> None:
    key = generate_p256()
    with pytest.raises(MeshError, match=message):
        validate_answer(key, spoil(_answer(key), key))
