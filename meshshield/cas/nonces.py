"""Attestation nonces that the CAS can check without having stored them.

A nonce (SPEC §5: 32 bytes, standard base64 on the wire) is made of two halves:

    block = AES-256(k_enc, expiry (4 bytes, big-endian Unix seconds) || 12 random bytes)
    tag   = HMAC-SHA-256(k_mac, block)[:16]
    nonce = block || tag

Both keys are derived (HKDF-SHA-256) from the CAS's key-encryption key, which every
replica of one store shares, so a nonce minted by one replica opens on any other. The
block is one AES block under a key used for nothing else: a pseudo-random permutation,
so the whole nonce looks like 32 random bytes to anyone without the key, and it needs
no IV. The tag makes a nonce the CAS did not mint (or one altered in any bit) fail to
open; the expiry inside it says until when it may be used.

What this saves: issuing a nonce is a local computation (about 10 µs), not a database
write, and attesting with one is one write, not a delete of a row written earlier.

Single use stays global: `Store.use_nonce` records each nonce when it is used, with a
unique key, so a second use, on this replica or any other, is refused; records are
purged once their nonce has expired by more than `PURGE_MARGIN` (replica clocks may
differ by less than that: a record purged early would let its nonce be used again on a
replica whose clock is behind).
"""

from __future__ import annotations

import hmac
import os
import struct
from datetime import UTC, datetime, timedelta
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshshield.attestation.claims import NONCE_SIZE

BLOCK = 16
TAG = NONCE_SIZE - BLOCK
PURGE_MARGIN = timedelta(minutes=5)
_INFO = b"meshshield/v1 cas attestation nonces"


class NonceMint:
    """Mints and opens nonces under keys derived from `kek` (32 bytes)."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ValueError(f"the key-encryption key must be 32 bytes, found {len(kek)}")
        keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=_INFO).derive(kek)
        self._cipher = Cipher(algorithms.AES256(keys[:32]), modes.ECB())  # noqa: S305 - one block, a PRP
        self._mac_key = keys[32:]

    def _tag(self, block: bytes) -> bytes:
        return hmac.new(self._mac_key, block, sha256).digest()[:TAG]

    def mint(self, expires_at: datetime) -> bytes:
        """A fresh nonce that opens until `expires_at` (whole seconds)."""
        seconds = int(expires_at.timestamp())
        if not 0 <= seconds < 2**32:
            raise ValueError(f"nonce expiry {expires_at.isoformat()} is out of range")
        enc = self._cipher.encryptor()
        block = enc.update(struct.pack(">I", seconds) + os.urandom(BLOCK - 4)) + enc.finalize()
        return block + self._tag(block)

    def open(self, nonce: bytes) -> datetime | None:
        """The expiry inside a nonce this CAS (or a replica) minted; None for any other
        bytes: a wrong size, a tag that does not match."""
        if len(nonce) != NONCE_SIZE:
            return None
        block, tag = nonce[:BLOCK], nonce[BLOCK:]
        if not hmac.compare_digest(self._tag(block), tag):
            return None
        dec = self._cipher.decryptor()
        plain = dec.update(block) + dec.finalize()
        (seconds,) = struct.unpack(">I", plain[:4])
        return datetime.fromtimestamp(seconds, UTC)
