"""TEE sealing keys for the CAS's key-encryption key: a key only this TEE, running this
measurement, can derive again.

- sim: HKDF-SHA256 of the sim platform private key, mixed with the measurement. The sim
  platform key stands in for the chip: replicas on other "chips" (other sim keys) derive
  other keys, as SEV-SNP replicas on other machines do. SIMULATED: whoever holds the sim
  key file derives it too.
- SEV-SNP: `SNP_GET_DERIVED_KEY` on /dev/sev-guest (the guest's MSG_KEY_REQ to the PSP),
  root key VCEK (chip-bound), mixing in the guest policy and the measurement.
- SGX (Gramine): /dev/attestation/keys/_sgx_mrenclave, the enclave's MRENCLAVE-bound
  sealing key, stretched to 32 bytes with HKDF.
- TDX (and an unattested CAS): no sealing key. The KEK is kept by peer recovery and the
  recovery keys alone.

`sealing_for(platform, ...)` picks one; `SealingUnavailable` says why none works here.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshshield.attestation.claims import Platform
from meshshield.attestation.sim import sim_platform_key_id

KEY_SIZE = 32


class SealingUnavailable(Exception):
    """This TEE offers no sealing key here (the message says what is missing)."""


class Sealing(Protocol):
    @property
    def platform(self) -> Platform: ...

    @property
    def simulated(self) -> bool: ...

    @property
    def key_id(self) -> str:
        """Which TEE identity the key belongs to (stored beside the sealed KEK)."""
        ...

    def derive(self) -> bytes:
        """The 32-byte sealing key; SealingUnavailable if the TEE cannot give it."""
        ...

    def describe(self) -> str: ...


def _hkdf(ikm: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True)
class SimSealing:
    sim_key: ec.EllipticCurvePrivateKey
    measurement: str
    platform: Platform = Platform.SIM
    simulated: bool = True

    @property
    def key_id(self) -> str:
        return f"sim:{sim_platform_key_id(self.sim_key.public_key())[:16]}:{self.measurement}"

    def derive(self) -> bytes:
        scalar = self.sim_key.private_numbers().private_value.to_bytes(32, "big")
        return _hkdf(scalar, b"meshshield/cas/sealing/sim/v1:" + self.measurement.encode())

    def describe(self) -> str:
        return ("sealing key: SIMULATED (derived from the sim platform key and the "
                "measurement; no hardware guarantee)")


# -- SEV-SNP ---------------------------------------------------------------------------------

SEV_GUEST = Path("/dev/sev-guest")
# struct snp_derived_key_req (linux/sev-guest.h): root_key_select u32, rsvd u32,
# guest_field_select u64, vmpl u32, guest_svn u32, tcb_version u64.
_KEY_REQ = struct.Struct("<IIQIIQ")
# guest_field_select bits (SEV-SNP ABI, MSG_KEY_REQ): 0 guest policy, 1 image id,
# 2 family id, 3 measurement, 4 guest SVN, 5 TCB version.
FIELD_GUEST_POLICY = 1 << 0
FIELD_MEASUREMENT = 1 << 3
ROOT_KEY_VCEK = 0
# struct snp_guest_request_ioctl: u8 msg_version; u64 req_data; u64 resp_data; u64 exitinfo2
_IOCTL_REQ = struct.Struct("<B7xQQQ")
_RESP_SIZE = 64  # struct snp_derived_key_resp: status u32, reserved 28, key 32


def _iowr(kind: str, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


SNP_GET_DERIVED_KEY = _iowr("S", 0x1, _IOCTL_REQ.size)


def snp_key_request(vmpl: int = 0) -> bytes:
    """The MSG_KEY_REQ body: VCEK root, mixing the guest policy and the measurement."""
    return _KEY_REQ.pack(ROOT_KEY_VCEK, 0, FIELD_GUEST_POLICY | FIELD_MEASUREMENT, vmpl, 0, 0)


def parse_snp_key_response(resp: bytes) -> bytes:
    """The derived key from a snp_derived_key_resp; SealingUnavailable on a firmware error."""
    if len(resp) != _RESP_SIZE:
        raise SealingUnavailable(f"SNP derived-key answer is {len(resp)} bytes, expected "
                                 f"{_RESP_SIZE}")
    status = int.from_bytes(resp[:4], "little")
    if status != 0:
        raise SealingUnavailable(f"the SEV-SNP firmware refused MSG_KEY_REQ (status {status:#x})")
    return resp[32:64]


@dataclass(frozen=True)
class SnpSealing:
    measurement: str
    device: Path = SEV_GUEST
    platform: Platform = Platform.SEV_SNP
    simulated: bool = False

    @property
    def key_id(self) -> str:
        return f"sev-snp:{self.measurement}"

    def derive(self) -> bytes:
        if not self.device.exists():
            raise SealingUnavailable(
                f"SEV-SNP sealing needs {self.device} (the sev-guest driver inside an SNP "
                "guest); it is not there, so this CAS cannot seal its KEK to the chip")
        req = ctypes.create_string_buffer(snp_key_request(), _KEY_REQ.size)
        resp = ctypes.create_string_buffer(_RESP_SIZE)
        arg = bytearray(_IOCTL_REQ.pack(1, ctypes.addressof(req), ctypes.addressof(resp), 0))
        fd = os.open(self.device, os.O_RDWR)
        try:
            fcntl.ioctl(fd, SNP_GET_DERIVED_KEY, arg, True)
        except OSError as e:
            exitinfo = _IOCTL_REQ.unpack(bytes(arg))[3]
            raise SealingUnavailable(f"SNP_GET_DERIVED_KEY on {self.device} failed: "
                                     f"{e.strerror} (exitinfo2 {exitinfo:#x})") from None
        finally:
            os.close(fd)
        return parse_snp_key_response(resp.raw)

    def describe(self) -> str:
        return "sealing key: SEV-SNP MSG_KEY_REQ (VCEK, guest policy + measurement)"


# -- SGX (Gramine) ---------------------------------------------------------------------------

GRAMINE_MRENCLAVE_KEY = Path("/dev/attestation/keys/_sgx_mrenclave")


@dataclass(frozen=True)
class GramineSealing:
    measurement: str
    path: Path = GRAMINE_MRENCLAVE_KEY
    platform: Platform = Platform.SGX
    simulated: bool = False

    @property
    def key_id(self) -> str:
        return f"sgx-mrenclave:{self.measurement}"

    def derive(self) -> bytes:
        try:
            with self.path.open("rb") as f:
                raw = f.read(65)
        except OSError as e:
            raise SealingUnavailable(
                f"SGX sealing needs Gramine's {self.path} (run the CAS under Gramine with "
                f"sgx.remote_attestation set): {e.strerror}") from None
        if len(raw) != 16:
            raise SealingUnavailable(f"{self.path} gave {len(raw)} bytes; Gramine's SGX "
                                     "sealing keys are 16 bytes")
        return _hkdf(raw, b"meshshield/cas/sealing/sgx-mrenclave/v1")

    def describe(self) -> str:
        return "sealing key: SGX MRENCLAVE sealing key (Gramine)"


def sealing_for(platform: Platform, measurement: str | None,
                sim_key: ec.EllipticCurvePrivateKey | None = None) -> Sealing | None:
    """The sealing key source for a CAS on `platform`; None where the TEE has none (TDX)."""
    m = measurement or "unknown"
    if platform is Platform.SIM:
        if sim_key is None:
            raise SealingUnavailable("sim sealing needs the sim platform key (--sim-key)")
        return SimSealing(sim_key, m)
    if platform is Platform.SEV_SNP:
        return SnpSealing(m)
    if platform is Platform.SGX:
        return GramineSealing(m)
    return None
