"""CA rotation as tables: at each time, who signs and what the bundle holds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.pki import CaRecord, CaSet, generate_ca, load_pem_chain

TD = "mesh.example"
T0 = datetime(2030, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
PLAN_AT = T0 + 100 * H
ACTIVATE_AFTER = 24 * H
ACTIVATE_AT = PLAN_AT + ACTIVATE_AFTER
LAST_LEAF_OF_A = ACTIVATE_AT + H  # A signed a 1 h leaf just before B took over
PROMOTE_AT = ACTIVATE_AT + timedelta(minutes=5)

_A = generate_ca(TD, T0)
_B = generate_ca(TD, PLAN_AT)
_C = generate_ca(TD, PLAN_AT)


def names(certs: list[x509.Certificate]) -> list[str]:
    by_cert = {_A[0]: "A", _B[0]: "B", _C[0]: "C"}
    return [by_cert[c] for c in certs]


def name_of(record: CaRecord) -> str:
    return names([record.cert])[0]


def initial() -> CaSet:
    return CaSet([CaRecord(_A[0], _A[1], "active")])


def planned() -> CaSet:
    return CaSet(initial().plan_rotation(PLAN_AT, _B[0], _B[1], ACTIVATE_AFTER))


def promoted() -> CaSet:
    return CaSet(planned().promote(PROMOTE_AT, LAST_LEAF_OF_A))


# (phase, time, expected signer, expected bundle)
TABLE = [
    ("initial", T0, "A", ["A"]),
    ("initial", PLAN_AT, "A", ["A"]),
    # The next CA is in the bundle from the moment it is planned, a day before it signs.
    ("planned", PLAN_AT, "A", ["A", "B"]),
    ("planned", ACTIVATE_AT - timedelta(seconds=1), "A", ["A", "B"]),
    # Due: B signs even before promote runs; A stays trusted.
    ("planned", ACTIVATE_AT, "B", ["B", "A"]),
    ("planned", ACTIVATE_AT + 10 * H, "B", ["B", "A"]),
    ("promoted", PROMOTE_AT, "B", ["B", "A"]),
    # A leaves the bundle exactly when the last leaf it signed expires.
    ("promoted", LAST_LEAF_OF_A - timedelta(seconds=1), "B", ["B", "A"]),
    ("promoted", LAST_LEAF_OF_A, "B", ["B"]),
    ("promoted", LAST_LEAF_OF_A + 1000 * H, "B", ["B"]),
]


@pytest.mark.parametrize(("phase", "now", "signer", "bundle"), TABLE)
def test_rotation_table(phase: str, now: datetime, signer: str, bundle: list[str]) -> None:
    cas = {"initial": initial, "planned": planned, "promoted": promoted}[phase]()
    assert name_of(cas.signing_ca(now)) == signer
    assert names(cas.bundle(now)) == bundle
    assert names(load_pem_chain(cas.bundle_pem(now))) == bundle


def test_records_after_each_step() -> None:
    p = planned()
    assert [(name_of(r), r.state, r.activate_at, r.retire_after) for r in p.records] == [
        ("A", "active", None, None), ("B", "next", ACTIVATE_AT, None)
    ]
    q = promoted()
    assert [(name_of(r), r.state, r.retire_after) for r in q.records] == [
        ("A", "retired", LAST_LEAF_OF_A), ("B", "active", None)
    ]
    assert [name_of(r) for r in q.prune(LAST_LEAF_OF_A - timedelta(seconds=1))] == ["A", "B"]
    assert [name_of(r) for r in q.prune(LAST_LEAF_OF_A)] == ["B"]


@pytest.mark.parametrize(
    "now", [PLAN_AT, ACTIVATE_AT - timedelta(seconds=1)]
)
def test_promote_before_due_changes_nothing(now: datetime) -> None:
    p = planned()
    assert p.promote(now, LAST_LEAF_OF_A) == list(p.records)
    assert initial().promote(now, LAST_LEAF_OF_A) == list(initial().records)


def test_retire_after_capped_at_old_ca_expiry() -> None:
    far = _A[0].not_valid_after_utc + 1000 * H
    q = CaSet(planned().promote(PROMOTE_AT, far))
    assert q.records[0].retire_after == _A[0].not_valid_after_utc


def test_second_rotation_after_the_first() -> None:
    q = promoted()
    later = LAST_LEAF_OF_A + 10 * H
    r = CaSet(q.plan_rotation(later, _C[0], _C[1], ACTIVATE_AFTER))
    assert names(r.bundle(later)) == ["B", "C"]  # A has already left
    assert name_of(r.signing_ca(later + ACTIVATE_AFTER)) == "C"


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (lambda: planned().plan_rotation(PLAN_AT, _C[0], _C[1], ACTIVATE_AFTER),
         "already planned"),
        (lambda: initial().plan_rotation(PLAN_AT, _B[0], _B[1], timedelta(0)),
         "must be positive"),
        (lambda: initial().plan_rotation(PLAN_AT, _B[0], _C[1], ACTIVATE_AFTER),
         "does not match"),
        (lambda: initial().plan_rotation(PLAN_AT, _A[0], _A[1], ACTIVATE_AFTER),
         "already in the set"),
        (lambda: initial().plan_rotation(PLAN_AT, _B[0], _B[1], timedelta(days=4000)),
         "expires"),
    ],
)
def test_plan_rotation_refuses(step: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        step()  # type: ignore[operator]


def _rec(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], state: str,
         **kw: datetime) -> CaRecord:
    return CaRecord(ca[0], ca[1], state, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "exactly one active CA, found 0"),
        ([_rec(_A, "active"), _rec(_B, "active")], "exactly one active CA, found 2"),
        ([_rec(_A, "active"), _rec(_B, "next", activate_at=T0),
          _rec(_C, "next", activate_at=T0)], "at most one next"),
        ([_rec(_A, "active"), _rec(_B, "next")], "has no activate_at"),
        ([_rec(_A, "active"), _rec(_B, "retired")], "has no retire_after"),
    ],
)
def test_invalid_sets(records: list[CaRecord], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CaSet(records)


def test_key_not_loaded_is_still_a_valid_set() -> None:
    r = replace(_rec(_A, "active"), key=None)
    assert CaSet([r]).signing_ca(T0).key is None


def test_simulated_mesh_never_loses_trust() -> None:
    """Every 10 minutes for 4 days: issue a 1 h leaf, promote when due, prune; a
    rotation is planned on day 1. At every tick, every unexpired leaf's CA is in the
    bundle, and a CA was in the bundle at the tick before it first signed."""
    ttl, tick = H, timedelta(minutes=10)
    records = initial().records
    issued: list[tuple[str, datetime]] = []  # (CA fingerprint, leaf not_after)
    previous_bundle: set[str] = set()
    first_signed: set[str] = set()
    now = T0
    while now < T0 + timedelta(days=4):
        cas = CaSet(records)
        if now == T0 + timedelta(days=1):
            records = tuple(cas.plan_rotation(now, _B[0], _B[1], ACTIVATE_AFTER))
            cas = CaSet(records)
        active_fp = cas.active.fingerprint
        last_of_active = max((na for fp, na in issued if fp == active_fp), default=now)
        records = tuple(CaSet(cas.promote(now, last_of_active)).prune(now))
        cas = CaSet(records)
        signer = cas.signing_ca(now)
        bundle = {CaRecord(c, None, "active").fingerprint for c in cas.bundle(now)}
        if signer.fingerprint not in first_signed:
            if issued:  # the very first CA bootstraps the mesh
                assert signer.fingerprint in previous_bundle
            first_signed.add(signer.fingerprint)
        issued.append((signer.fingerprint, now + ttl))
        for fp, not_after in issued:
            if not_after > now:
                assert fp in bundle
        previous_bundle = bundle
        now += tick
    assert len(first_signed) == 2
    assert names(CaSet(records).bundle(now)) == ["B"]


# -- forced rotation (key compromise) ---------------------------------------------------

def test_forced_rotation_signs_at_once_and_empties_the_bundle_of_every_other_ca() -> None:
    planned = CaSet(initial().plan_rotation(PLAN_AT, _B[0], _B[1], ACTIVATE_AFTER))
    at = PLAN_AT + H
    forced = CaSet(planned.force_rotation(at, _C[0], _C[1]))
    assert name_of(forced.active) == "C" and forced.next is None
    assert name_of(forced.signing_ca(at)) == "C"
    assert names(forced.bundle(at)) == ["C"]
    assert {name_of(r): r.state for r in forced.records} == {
        "A": "retired", "B": "retired", "C": "active"}


def test_forced_rotation_refuses_a_mismatched_key_or_a_known_ca() -> None:
    with pytest.raises(ValueError, match="does not match"):
        initial().force_rotation(PLAN_AT, _B[0], _C[1])
    with pytest.raises(ValueError, match="already in the set"):
        initial().force_rotation(PLAN_AT, _A[0], _A[1])
