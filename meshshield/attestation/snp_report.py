"""The AMD SEV-SNP attestation report: bytes in, a typed report out (no cryptography).

Layout (AMD SEV-SNP firmware ABI spec #56860, table ATTESTATION_REPORT; integers
little-endian; 1184 bytes)::

    0x000  4  VERSION            2, 3 or 5 (3 adds CPUID; 5 adds mitigation vectors)
    0x004  4  GUEST_SVN
    0x008  8  POLICY             bit 17 must be one, bits 63:26 must be zero; bit 19 DEBUG
    0x010 16  FAMILY_ID          0x020 16 IMAGE_ID
    0x030  4  VMPL
    0x034  4  SIGNATURE_ALGO     1 = ECDSA P-384 with SHA-384
    0x038  8  CURRENT_TCB        TCB_VERSION, see below
    0x040  8  PLATFORM_INFO
    0x048  4  bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY
              (0 VCEK, 1 VLEK, 7 none; 2-6 reserved), bits 31:5 must be zero
    0x04C  4  reserved, zero
    0x050 64  REPORT_DATA        0x090 48 MEASUREMENT      0x0C0 32 HOST_DATA
    0x0E0 48  ID_KEY_DIGEST      0x110 48 AUTHOR_KEY_DIGEST
    0x140 32  REPORT_ID          0x160 32 REPORT_ID_MA
    0x180  8  REPORTED_TCB       the TCB the VCEK/VLEK was derived for
    0x188  3  CPUID family, model, stepping (version 3 and later); zero up to 0x1A0
    0x1A0 64  CHIP_ID            zero when masked; Turin uses the first 8 bytes
    0x1E0  8  COMMITTED_TCB      0x1E8 current build, minor, major, 0; 0x1EC committed
    0x1F0  8  LAUNCH_TCB         0x1F8 8 LAUNCH_MIT_VECTOR, 0x200 8 CURRENT_MIT_VECTOR
              (version 5); zero up to 0x2A0
    0x2A0 512 SIGNATURE          R (72 B) then S (72 B), little-endian; zero after 0x330

The signature covers bytes 0x000..0x29F. TCB_VERSION is ``[bootloader, tee, 0, 0, 0, 0,
snp, microcode]`` on Milan and Genoa and ``[fmc, bootloader, tee, snp, 0, 0, 0,
microcode]`` on Turin, so it is decoded only once the product is known.

`parse_snp_report` is strict: any report it returns has a supported version and
signature algorithm and zeros in every field the ABI reserves; anything else raises
EvidenceError(evidence_malformed) naming the offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from meshshield.errors import EvidenceError, Reason

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SUPPORTED_VERSIONS = (2, 3, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1
ECDSA_COMPONENT_SIZE = 72
POLICY_DEBUG_BIT = 19
POLICY_MUST_BE_ONE_BIT = 17
POLICY_HIGHEST_DEFINED_BIT = 25


class Product(StrEnum):
    MILAN = "milan"
    GENOA = "genoa"
    TURIN = "turin"


class SigningKey(IntEnum):
    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True)
class TcbVersion:
    """One TCB_VERSION decoded for a product; `fmc` is None before Turin."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None
    reserved: bytes  # the bytes the layout leaves unnamed, in report order

    def to_json(self) -> dict[str, int]:
        out = {
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out


def decode_tcb(raw: bytes, product: Product) -> TcbVersion:
    """Decode an 8-byte TCB_VERSION with the layout of `product`."""
    if len(raw) != 8:
        raise ValueError(f"TCB_VERSION is 8 bytes, got {len(raw)}")
    if product is Product.TURIN:
        return TcbVersion(raw[1], raw[2], raw[3], raw[7], raw[0], bytes(raw[4:7]))
    return TcbVersion(raw[0], raw[1], raw[6], raw[7], None, bytes(raw[2:6]))


def product_from_cpuid(family: int, model: int) -> Product | None:
    """The SEV product of a CPUID family/model pair (AMD KDS spec), or None if unknown."""
    if family == 0x19:
        if model <= 0x0F:
            return Product.MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:  # Genoa; Bergamo and Siena
            return Product.GENOA
    if family == 0x1A and model <= 0x1F:
        return Product.TURIN
    return None


@dataclass(frozen=True)
class SnpReport:
    """A parsed report. TCB fields stay raw until the product is known."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: bytes
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: bytes
    cpuid: tuple[int, int, int] | None  # family, model, stepping (version 3+)
    chip_id: bytes
    committed_tcb: bytes
    current_firmware: tuple[int, int, int]  # major, minor, build
    committed_firmware: tuple[int, int, int]
    launch_tcb: bytes
    launch_mit_vector: int | None  # version 5
    current_mit_vector: int | None
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def cpuid_product(self) -> Product | None:
        return None if self.cpuid is None else product_from_cpuid(self.cpuid[0], self.cpuid[1])

    def firmware_json(self) -> dict[str, Any]:
        cur, com = self.current_firmware, self.committed_firmware
        return {
            "current": ".".join(str(v) for v in cur),
            "committed": ".".join(str(v) for v in com),
        }


def _malformed(message: str) -> EvidenceError:
    return EvidenceError(Reason.EVIDENCE_MALFORMED, "sev-snp report: " + message)


def _require_zero(data: bytes, start: int, end: int, what: str) -> None:
    for i in range(start, end):
        if data[i]:
            raise _malformed(
                f"{what} (bytes 0x{start:03x}..0x{end - 1:03x}) must be zero, "
                f"found 0x{data[i]:02x} at offset 0x{i:03x}"
            )


def _u32(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 4], "little")


def _u64(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 8], "little")


def _check_policy(policy: int) -> None:
    if not policy >> POLICY_MUST_BE_ONE_BIT & 1:
        raise _malformed(
            f"guest policy 0x{policy:x} at offset 0x008 has bit {POLICY_MUST_BE_ONE_BIT} clear; "
            "the ABI reserves it as one"
        )
    high = policy >> (POLICY_HIGHEST_DEFINED_BIT + 1)
    if high:
        bit = (high & -high).bit_length() + POLICY_HIGHEST_DEFINED_BIT
        raise _malformed(
            f"guest policy 0x{policy:x} at offset 0x008 sets reserved bit {bit} "
            f"(bits 63:{POLICY_HIGHEST_DEFINED_BIT + 1} must be zero)"
        )


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse a 1184-byte attestation report strictly (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _malformed(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise _malformed(
            f"a report is exactly {REPORT_SIZE} bytes (0x{REPORT_SIZE:x}), got {len(data)}"
            + (" (truncated)" if len(data) < REPORT_SIZE else " (trailing bytes)")
        )
    version = _u32(data, 0x000)
    if version not in SUPPORTED_VERSIONS:
        raise _malformed(
            f"VERSION at offset 0x000 is {version}; supported versions are "
            + ", ".join(map(str, SUPPORTED_VERSIONS))
        )
    sig_algo = _u32(data, 0x034)
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise _malformed(
            f"SIGNATURE_ALGO at offset 0x034 is {sig_algo}; only 1 (ECDSA P-384 with SHA-384) "
            "is defined"
        )
    policy = _u64(data, 0x008)
    _check_policy(policy)
    signer_info = _u32(data, 0x048)
    if signer_info >> 5:
        raise _malformed(
            f"signer info 0x{signer_info:08x} at offset 0x048 sets reserved bits 31:5"
        )
    key_code = signer_info >> 2 & 7
    if key_code not in SigningKey._value2member_map_:
        raise _malformed(
            f"SIGNING_KEY at offset 0x048 bits 4:2 is {key_code}; values 2-6 are reserved "
            "(0 = VCEK, 1 = VLEK, 7 = none)"
        )
    _require_zero(data, 0x04C, 0x050, "reserved field after signer info")
    cpuid: tuple[int, int, int] | None = None
    if version >= 3:
        cpuid = (data[0x188], data[0x189], data[0x18A])
        _require_zero(data, 0x18B, 0x1A0, "reserved field after CPUID")
    else:
        _require_zero(data, 0x188, 0x1A0, "reserved field after REPORTED_TCB")
    _require_zero(data, 0x1EB, 0x1EC, "reserved byte after CURRENT_MAJOR")
    _require_zero(data, 0x1EF, 0x1F0, "reserved byte after COMMITTED_MAJOR")
    launch_mit: int | None = None
    current_mit: int | None = None
    if version >= 5:
        launch_mit, current_mit = _u64(data, 0x1F8), _u64(data, 0x200)
        _require_zero(data, 0x208, SIGNED_SIZE, "reserved field after CURRENT_MIT_VECTOR")
    else:
        _require_zero(data, 0x1F8, SIGNED_SIZE, "reserved field after LAUNCH_TCB")
    sig_end = SIGNED_SIZE + 2 * ECDSA_COMPONENT_SIZE
    _require_zero(data, sig_end, REPORT_SIZE, "reserved part of SIGNATURE")
    mask_chip_key = bool(signer_info & 2)
    chip_id = data[0x1A0:0x1E0]
    if mask_chip_key and any(chip_id):
        raise _malformed(
            "MASK_CHIP_KEY is set (offset 0x048 bit 1) but CHIP_ID at offset 0x1a0 is not zero"
        )
    return SnpReport(
        raw=data,
        version=version,
        guest_svn=_u32(data, 0x004),
        policy=policy,
        family_id=data[0x010:0x020],
        image_id=data[0x020:0x030],
        vmpl=_u32(data, 0x030),
        signature_algo=sig_algo,
        current_tcb=data[0x038:0x040],
        platform_info=_u64(data, 0x040),
        author_key_en=bool(signer_info & 1),
        mask_chip_key=mask_chip_key,
        signing_key=SigningKey(key_code),
        report_data=data[0x050:0x090],
        measurement=data[0x090:0x0C0],
        host_data=data[0x0C0:0x0E0],
        id_key_digest=data[0x0E0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=data[0x180:0x188],
        cpuid=cpuid,
        chip_id=chip_id,
        committed_tcb=data[0x1E0:0x1E8],
        current_firmware=(data[0x1EA], data[0x1E9], data[0x1E8]),
        committed_firmware=(data[0x1EE], data[0x1ED], data[0x1EC]),
        launch_tcb=data[0x1F0:0x1F8],
        launch_mit_vector=launch_mit,
        current_mit_vector=current_mit,
        signature_r=int.from_bytes(data[SIGNED_SIZE : SIGNED_SIZE + 72], "little"),
        signature_s=int.from_bytes(data[SIGNED_SIZE + 72 : sig_end], "little"),
    )

