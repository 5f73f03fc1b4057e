"""CSR intake: only a well-formed, self-signed P-256 request yields a key."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pki_helpers import csr_signed_by_other_key, make_csr, pem

from meshshield.errors import MeshError, Reason
from meshshield.pki import MAX_CSR_BYTES, generate_p256, public_key_from_csr, spki_der


@pytest.fixture(scope="module")
def p256_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = generate_p256()
    return key, make_csr(key)


def test_valid_csr_yields_its_key(p256_csr: tuple[ec.EllipticCurvePrivateKey, bytes]) -> None:
    key, csr = p256_csr
    for form in (csr, csr.decode(), b"some text before\n" + csr + b"\nand after\n"):
        got = public_key_from_csr(form)
        assert spki_der(got) == spki_der(key.public_key())


def test_spliced_csr_itself_is_well_formed() -> None:
    key = generate_p256()
    spliced = x509.load_pem_x509_csr(csr_signed_by_other_key(key, key))
    assert spliced.is_signature_valid  # the splice is right; only the signer differs below


def refuse(data: str | bytes, message: str) -> MeshError:
    with pytest.raises(MeshError, match=message) as info:
        public_key_from_csr(data)
    assert info.value.reason is Reason.CSR_INVALID
    return info.value


def test_signed_by_another_key() -> None:
    refuse(csr_signed_by_other_key(generate_p256(), generate_p256()),
           "signed by another key")


def test_tampered_subject_breaks_signature(
    p256_csr: tuple[ec.EllipticCurvePrivateKey, bytes],
) -> None:
    der = x509.load_pem_x509_csr(p256_csr[1]).public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"ignored", b"IGNORED")
    assert tampered != der
    refuse(pem("CERTIFICATE REQUEST", tampered), "signature does not verify")


def test_rsa_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refuse(make_csr(key), r"RSA-2048 key; an EC P-256 \(secp256r1\) key is required")


def test_p384_key() -> None:
    refuse(make_csr(ec.generate_private_key(ec.SECP384R1())),
           "EC key on curve secp384r1; an EC P-256")


def test_ed25519_key() -> None:
    refuse(make_csr(ed25519.Ed25519PrivateKey.generate()), "Ed25519 key; an EC P-256")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not PEM"),
        (b"\x00\x01garbage\xff", "not PEM"),
        ("caf\u00e9", "non-ASCII"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
         "is a 'CERTIFICATE', expected a 'CERTIFICATE REQUEST'"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
         "does not parse"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
         "does not parse"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE-----\n",
         "mismatched END"),
    ],
)
def test_not_a_csr(data: bytes | str, message: str) -> None:
    refuse(data, message)


def test_truncated_pem(p256_csr: tuple[ec.EllipticCurvePrivateKey, bytes]) -> None:
    csr = p256_csr[1]
    refuse(csr[: len(csr) // 2], "truncated")
    # Cut inside the base64 but keep the END line: the DER is short.
    lines = csr.splitlines()
    refuse(b"\n".join([lines[0], lines[1], lines[-1]]) + b"\n", "does not parse")


def test_two_blocks(p256_csr: tuple[ec.EllipticCurvePrivateKey, bytes]) -> None:
    other = make_csr(generate_p256())
    refuse(p256_csr[1] + other, "holds 2 blocks")


def test_oversize(p256_csr: tuple[ec.EllipticCurvePrivateKey, bytes]) -> None:
    padded = p256_csr[1] + b"\n" * (MAX_CSR_BYTES + 1 - len(p256_csr[1]))
    refuse(padded, f"at most {MAX_CSR_BYTES}")
    refuse(padded.decode(), f"at most {MAX_CSR_BYTES}")
    assert public_key_from_csr(padded[:MAX_CSR_BYTES])  # at the limit is fine


def only_csr_invalid(data: bytes) -> None:
    try:
        public_key_from_csr(data)
    except MeshError as e:
        assert e.reason is Reason.CSR_INVALID


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024))
def test_arbitrary_bytes(data: bytes) -> None:
    only_csr_invalid(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_der_in_a_pem_envelope(der: bytes) -> None:
    only_csr_invalid(pem("CERTIFICATE REQUEST", der))


_GENUINE = x509.load_pem_x509_csr(make_csr(generate_p256())).public_bytes(
    serialization.Encoding.DER
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_GENUINE) - 1), st.integers(0, 255)),
                min_size=1, max_size=4),
       st.integers(0, len(_GENUINE)))
@example(edits=[(7, 1)], cut=0)  # version 1: cryptography raises InvalidVersion
def test_mutated_genuine_csr(edits: list[tuple[int, int]], cut: int) -> None:
    der = bytearray(_GENUINE)
    for pos, value in edits:
        der[pos] = value
    only_csr_invalid(pem("CERTIFICATE REQUEST", bytes(der[:cut] if cut else der)))
