"""Private keys sealed at rest, and the KEK secret file."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.errors import MeshError
from meshshield.pki import (
    SealedKeyError,
    derive_kek,
    generate_p256,
    load_or_create_kek,
    seal_private_key,
    spki_der,
    unseal_private_key,
)

KEK = derive_kek(b"s" * 32)
CTX = b"ca/1"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return generate_p256()


@pytest.fixture(scope="module")
def blob(key: ec.EllipticCurvePrivateKey) -> bytes:
    return seal_private_key(key, KEK, CTX)


def same_key(a: ec.EllipticCurvePrivateKey, b: ec.EllipticCurvePrivateKey) -> bool:
    return spki_der(a.public_key()) == spki_der(b.public_key())


def test_round_trip(key: ec.EllipticCurvePrivateKey, blob: bytes) -> None:
    assert blob.startswith(b"MSSEALK\x01")
    assert same_key(unseal_private_key(blob, KEK, CTX), key)


def test_fresh_nonce_each_time(key: ec.EllipticCurvePrivateKey, blob: bytes) -> None:
    again = seal_private_key(key, KEK, CTX)
    assert again != blob
    assert same_key(unseal_private_key(again, KEK, CTX), key)


def test_plaintext_key_not_in_blob(key: ec.EllipticCurvePrivateKey, blob: bytes) -> None:
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    assert scalar not in blob


def test_wrong_kek(blob: bytes) -> None:
    with pytest.raises(SealedKeyError, match="wrong key-encryption key"):
        unseal_private_key(blob, derive_kek(b"t" * 32), CTX)


def test_wrong_context(blob: bytes) -> None:
    with pytest.raises(SealedKeyError, match="wrong key-encryption key"):
        unseal_private_key(blob, KEK, b"ca/2")


def test_every_flipped_bit_is_detected(blob: bytes) -> None:
    for i in range(len(blob)):
        for bit in (0, 7):
            damaged = bytearray(blob)
            damaged[i] ^= 1 << bit
            with pytest.raises(SealedKeyError):
                unseal_private_key(bytes(damaged), KEK, CTX)


def test_every_truncation_is_detected(blob: bytes) -> None:
    for n in range(len(blob)):
        with pytest.raises(SealedKeyError):
            unseal_private_key(blob[:n], KEK, CTX)
    with pytest.raises(SealedKeyError, match="truncated"):
        unseal_private_key(blob[:20], KEK, CTX)


def test_unknown_version(blob: bytes) -> None:
    with pytest.raises(SealedKeyError, match="format version 2"):
        unseal_private_key(blob[:7] + b"\x02" + blob[8:], KEK, CTX)


def test_sealed_key_error_is_a_mesh_error() -> None:
    assert issubclass(SealedKeyError, MeshError)


def test_kek_sizes(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        derive_kek(b"x" * 15)
    assert len(derive_kek(b"x" * 16)) == 32
    assert derive_kek(b"x" * 16) != derive_kek(b"y" * 16)
    with pytest.raises(ValueError, match="32 bytes"):
        seal_private_key(key, b"k" * 16, CTX)


def test_kek_file_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        kek = load_or_create_kek(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_bytes().strip(), validate=True)) == 32
    assert load_or_create_kek(path) == kek
    assert load_or_create_kek(str(path)) == kek
    assert [p.name for p in tmp_path.iterdir()] == ["kek"]  # no temporary left behind


def test_kek_file_concurrent_creators_agree(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_kek(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1


def test_kek_file_operator_provided(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    secret = os.urandom(24)
    path.write_text(base64.b64encode(secret).decode() + "\n")
    assert load_or_create_kek(path) == derive_kek(secret)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not base64!!\n", "not base64"), (base64.b64encode(b"short") + b"\n", "at least 16"),
     (b"A" * 5000, "larger than")],
)
def test_kek_file_bad(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "kek"
    path.write_bytes(content)
    with pytest.raises(SealedKeyError, match=message):
        load_or_create_kek(path)
