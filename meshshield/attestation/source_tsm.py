"""Evidence from Linux configfs-tsm (``/sys/kernel/config/tsm/report``), for SEV-SNP
and TDX guests (Linux 6.7+, CONFIG_TSM_REPORTS, the sev-guest or tdx-guest driver).

One report is one directory (kernel ABI: Documentation/ABI/testing/configfs-tsm):

1. ``mkdir report/<name>``: the kernel fills it with attribute files;
2. write ``privlevel`` (optional; the SNP VMPL to report at), then ``inblob`` (our 64
   bytes of report_data); each write increments ``generation``;
3. read ``generation``: it must equal the number of writes we made, else another
   process wrote to our entry;
4. read ``provider`` (``sev_guest`` or ``tdx_guest``), ``outblob`` (the SNP report
   or the TDX quote; the kernel asks the TEE on this read) and, for SEV-SNP,
   ``auxblob`` (the certificate table the host supplied with the report);
5. read ``generation`` again: if it moved, the blobs may belong to someone else's
   request, and they are discarded;
6. ``rmdir report/<name>``, whatever happened.

The SEV-SNP ``auxblob`` is the GHCB certificate table: 24-byte entries ``GUID (16 B) |
offset (u32 LE) | length (u32 LE)``, offsets from the table's start, ended by an
all-zero entry. The VCEK (or VLEK, whichever SIGNING_KEY names) goes first into the
evidence's ``certs``, then the ASK and ARK when present.

Needs root: configfs entries are created by root only. The filesystem is reached
through `TsmFs`, so tests run the same plumbing over a fake tree.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.serialization import Encoding

from meshshield.attestation.claims import Platform
from meshshield.attestation.snp_chain import load_certificates
from meshshield.attestation.snp_report import REPORT_SIZE
from meshshield.attestation.source_base import (
    EvidenceSourceError,
    b64,
    check_binding,
    require_report_data,
)
from meshshield.errors import EvidenceError

log = logging.getLogger(__name__)

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
PROVIDERS = {Platform.SEV_SNP: "sev_guest", Platform.TDX: "tdx_guest"}
MAX_BLOB = 1 << 20  # the kernel caps outblob at 32 KiB; certificate tables are ~5 KiB
MAX_SMALL = 4096
PRIVLEVEL_MAX = 3

# GHCB spec, SNP extended guest request certificate table.
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
CERT_TABLE_ENTRY = struct.Struct("<16sII")
SNP_KEY_INFO_OFFSET = 0x48


class TsmFs(Protocol):
    """The four filesystem operations configfs-tsm needs."""

    def mkdir(self, path: Path) -> None: ...
    def rmdir(self, path: Path) -> None: ...
    def write(self, path: Path, data: bytes) -> None: ...
    def read(self, path: Path, limit: int) -> bytes: ...


class KernelFs:
    """The real configfs: each attribute written with one write(2), read to EOF."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write to {path}")
        finally:
            os.close(fd)

    def read(self, path: Path, limit: int) -> bytes:
        with open(path, "rb") as f:
            return f.read(limit + 1)


@dataclass(frozen=True)
class TsmReport:
    provider: str
    generation: int
    outblob: bytes
    auxblob: bytes | None


def tsm_report(
    report_data: bytes,
    *,
    root: Path = DEFAULT_TSM_ROOT,
    privlevel: int | None = None,
    want_aux: bool = False,
    fs: TsmFs | None = None,
) -> TsmReport:
    """Run steps 1-6 of the module docstring; raises EvidenceSourceError."""
    require_report_data(report_data)
    if privlevel is not None and not 0 <= privlevel <= PRIVLEVEL_MAX:
        raise EvidenceSourceError(
            f"configfs-tsm privlevel must be 0..{PRIVLEVEL_MAX}, got {privlevel}"
        )
    ops: TsmFs = fs or KernelFs()
    root = Path(root)
    entry = root / f"meshshield-{os.getpid()}-{secrets.token_hex(6)}"
    _mkdir(ops, root, entry)
    try:
        writes = 0
        if privlevel is not None:
            _write(ops, entry / "privlevel", str(privlevel).encode())
            writes += 1
        _write(ops, entry / "inblob", bytes(report_data))
        writes += 1
        generation = _generation(ops, entry)
        if generation != writes:
            raise _concurrent(entry, f"is {generation} after our {writes} write(s)")
        provider = _read(ops, entry / "provider", MAX_SMALL).decode("ascii", "replace").strip()
        outblob = _read(ops, entry / "outblob", MAX_BLOB)
        auxblob = _read_aux(ops, entry / "auxblob") if want_aux else None
        after = _generation(ops, entry)
        if after != generation:
            raise _concurrent(entry, f"moved from {generation} to {after} while reading")
    finally:
        try:
            ops.rmdir(entry)
        except OSError as e:
            log.warning("could not remove configfs-tsm entry %s: %s", entry, e.strerror or e)
    if not outblob:
        raise EvidenceSourceError(
            f"{entry / 'outblob'} was empty: the {provider or 'TSM'} driver produced no "
            "report; check dmesg for sev-guest / tdx-guest errors"
        )
    return TsmReport(provider, generation, outblob, auxblob)


def tsm_evidence(
    platform: Platform,
    report_data: bytes,
    *,
    root: Path = DEFAULT_TSM_ROOT,
    privlevel: int | None = None,
    fs: TsmFs | None = None,
) -> dict[str, Any]:
    """SPEC §4 evidence JSON for `platform` (sev-snp or tdx) from configfs-tsm."""
    want = PROVIDERS.get(platform)
    if want is None:
        raise EvidenceSourceError(
            f"configfs-tsm gives sev-snp and tdx evidence, not {platform.value}; for sgx use "
            "MESHSHIELD_EVIDENCE_SOURCE=gramine"
        )
    snp = platform is Platform.SEV_SNP
    rep = tsm_report(report_data, root=root, privlevel=privlevel, want_aux=snp, fs=fs)
    if rep.provider != want:
        raise EvidenceSourceError(
            f"configfs-tsm at {root} is served by provider {rep.provider!r}, not {want!r}: "
            f"this guest is not a {platform.value} guest; attest with the platform it runs on"
        )
    where = f"configfs-tsm ({root}, {rep.provider})"
    if not snp:
        check_binding(platform, rep.outblob, report_data, where)
        return {"quote": b64(rep.outblob)}
    if len(rep.outblob) < REPORT_SIZE:
        raise EvidenceSourceError(
            f"{where} outblob is {len(rep.outblob)} bytes, shorter than a {REPORT_SIZE}-byte "
            "SEV-SNP attestation report"
        )
    report = rep.outblob[:REPORT_SIZE]
    check_binding(platform, report, report_data, where)
    certs = certs_from_cert_table(rep.auxblob or b"", signing_key_of(report), where)
    return {"report": b64(report), "certs": certs}


def signing_key_of(report: bytes) -> int:
    """SIGNING_KEY (bits 4:2 at 0x48): 0 VCEK, 1 VLEK."""
    (info,) = struct.unpack_from("<I", report, SNP_KEY_INFO_OFFSET)
    return int((info >> 2) & 0x7)


def parse_cert_table(table: bytes) -> dict[uuid.UUID, bytes]:
    """GUID -> certificate bytes of a GHCB certificate table; ValueError if malformed.

    GUIDs are read in RFC 4122 byte order, as the kernel and host tools write them;
    the mixed-endian (EFI) order is recognised too for the GUIDs we look for.
    """
    known = {GUID_VCEK, GUID_VLEK, GUID_ASK, GUID_ARK}
    out: dict[uuid.UUID, bytes] = {}
    pos = 0
    while True:
        if pos + CERT_TABLE_ENTRY.size > len(table):
            raise ValueError("the table has no all-zero terminating entry")
        raw_guid, offset, length = CERT_TABLE_ENTRY.unpack_from(table, pos)
        pos += CERT_TABLE_ENTRY.size
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return out
        if offset + length > len(table) or length == 0:
            raise ValueError(
                f"entry {uuid.UUID(bytes=raw_guid)} points at bytes {offset}..{offset + length}"
                f" of a {len(table)}-byte table"
            )
        guid = uuid.UUID(bytes=raw_guid)
        if guid not in known and uuid.UUID(bytes_le=raw_guid) in known:
            guid = uuid.UUID(bytes_le=raw_guid)
        out[guid] = table[offset : offset + length]


def certs_from_cert_table(table: bytes, signing_key: int, where: str) -> str:
    """PEM: the VCEK or VLEK (per SIGNING_KEY), then ASK and ARK when present."""
    leaf_guid, leaf = (GUID_VLEK, "VLEK") if signing_key == 1 else (GUID_VCEK, "VCEK")
    if not table.strip(b"\0"):
        raise EvidenceSourceError(
            f"{where} returned no certificate table (auxblob is empty): the host did not "
            f"supply the {leaf} with the report. Configure the host to provide the SNP "
            "certificates (extended guest request, e.g. `snphost import` on the host), "
            f"because the CAS verifies the {leaf} carried in the evidence"
        )
    try:
        entries = parse_cert_table(table)
    except ValueError as e:
        raise EvidenceSourceError(f"{where} auxblob is not a certificate table: {e}") from None
    if leaf_guid not in entries:
        present = ", ".join(sorted(str(g) for g in entries)) or "none"
        raise EvidenceSourceError(
            f"{where} certificate table has no {leaf} (GUID {leaf_guid}); entries: {present}. "
            f"The report was signed by the {leaf}: provide it in the host's certificate table"
        )
    pems: list[str] = []
    for guid, name in ((leaf_guid, leaf), (GUID_ASK, "ASK"), (GUID_ARK, "ARK")):
        if guid in entries:
            pems.append(_der_to_pem(entries[guid], name, where))
    return "".join(pems)


def _der_to_pem(der: bytes, name: str, where: str) -> str:
    try:
        certs = load_certificates(der)  # DER, padding after it allowed; or PEM
    except EvidenceError as e:
        raise EvidenceSourceError(
            f"{where}: the {name} in the certificate table is not a certificate ({e.message})"
        ) from None
    if len(certs) != 1:
        raise EvidenceSourceError(
            f"{where}: the {name} entry holds {len(certs)} certificates, expected one"
        )
    return certs[0].public_bytes(Encoding.PEM).decode("ascii")


def _mkdir(ops: TsmFs, root: Path, entry: Path) -> None:
    try:
        ops.mkdir(entry)
    except FileNotFoundError:
        raise EvidenceSourceError(
            f"configfs-tsm is not available: {root} does not exist. It needs Linux 6.7+ with "
            "CONFIG_TSM_REPORTS and the sev-guest or tdx-guest driver, and configfs mounted "
            "(mount -t configfs none /sys/kernel/config); inside a Confidential Containers "
            "pod use MESHSHIELD_EVIDENCE_SOURCE=coco-aa instead"
        ) from None
    except PermissionError:
        raise EvidenceSourceError(
            f"cannot create {entry}: permission denied. configfs-tsm report entries can "
            "only be created by root: run the sidecar as root in the confidential VM, or "
            "inside a Confidential Containers pod use MESHSHIELD_EVIDENCE_SOURCE=coco-aa"
        ) from None
    except OSError as e:
        raise EvidenceSourceError(f"cannot create {entry}: {e.strerror or e}") from None


def _write(ops: TsmFs, path: Path, data: bytes) -> None:
    try:
        ops.write(path, data)
    except OSError as e:
        raise EvidenceSourceError(
            f"writing {len(data)} bytes to {path} failed: {e.strerror or e}"
            + (" (privlevel below privlevel_floor?)" if path.name == "privlevel" else "")
        ) from None


def _read(ops: TsmFs, path: Path, limit: int) -> bytes:
    try:
        data = ops.read(path, limit)
    except OSError as e:
        hint = ""
        if path.name == "outblob":
            hint = (
                ": the TEE could not produce a report (for TDX, is the quote generation "
                "service reachable from the host?); check dmesg"
            )
        raise EvidenceSourceError(f"reading {path} failed: {e.strerror or e}{hint}") from None
    if len(data) > limit:
        raise EvidenceSourceError(f"{path} is larger than {limit} bytes")
    return data


def _read_aux(ops: TsmFs, path: Path) -> bytes:
    try:
        return _read(ops, path, MAX_BLOB)
    except EvidenceSourceError:
        # Kernels before 6.9 have no auxblob; the missing certificates are reported
        # (with what to do) by certs_from_cert_table.
        return b""


def _generation(ops: TsmFs, entry: Path) -> int:
    text = _read(ops, entry / "generation", MAX_SMALL).decode("ascii", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise EvidenceSourceError(
            f"{entry / 'generation'} holds {text[:20]!r}, not a number"
        ) from None


def _concurrent(entry: Path, what: str) -> EvidenceSourceError:
    return EvidenceSourceError(
        f"{entry / 'generation'} {what}: another process wrote to this configfs-tsm entry, "
        "so the report may not be ours; retry (and let one process at a time use an entry)"
    )
