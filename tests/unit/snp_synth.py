"""Synthetic SEV-SNP evidence for layouts with no public vector (report v5, Genoa, Turin).

A test chain shaped like AMD's: a self-signed RSA "ARK-<Product>" signs "SEV-<Product>"
(ASK) and "SEV-VLEK-<Product>" (ASVK) with RSASSA-PSS/SHA-384, which sign P-384 VCEKs
and VLEKs carrying AMD's extensions. Tests inject `SynthPki.roots` in place of the
pinned ARKs. RSA-2048 keeps key generation fast; the verifier does not care.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from meshshield.attestation.snp_report import Product

AMD = "1.3.6.1.4.1.3704.1"
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2049, 1, 1, tzinfo=UTC)
AT = datetime(2025, 6, 1, tzinfo=UTC)
CPUID = {Product.MILAN: (0x19, 0x01, 0x01), Product.GENOA: (0x19, 0x11, 0x01),
         Product.TURIN: (0x1A, 0x02, 0x00)}


def name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


@functools.cache
def rsa_key(slot: int) -> rsa.RSAPrivateKey:
    del slot  # one cached key per slot
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def p384_key(slot: int) -> ec.EllipticCurvePrivateKey:
    del slot
    return ec.generate_private_key(ec.SECP384R1())


def der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def ia5(s: str) -> bytes:
    return bytes([0x16, len(s)]) + s.encode()


def _ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def sign_cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: object,
    signer: rsa.RSAPrivateKey,
    *,
    ca: bool,
    extensions: tuple[x509.ExtensionType, ...] = (),
    not_before: datetime = NOT_BEFORE,
    not_after: datetime = NOT_AFTER,
    pss: bool = True,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    for e in extensions:
        b = b.add_extension(e, critical=False)
    if pss:
        return b.sign(signer, hashes.SHA384(), rsa_padding=PSS)
    return b.sign(signer, hashes.SHA384())


def tcb_bytes(product: Product, bl: int, tee: int, snp: int, ucode: int, fmc: int = 0) -> bytes:
    if product is Product.TURIN:
        return bytes([fmc, bl, tee, snp, 0, 0, 0, ucode])
    return bytes([bl, tee, 0, 0, 0, 0, snp, ucode])


@dataclass
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class SynthPki:
    """A test ARK/ASK/ASVK for one product."""

    product: Product
    ark: x509.Certificate = field(init=False)
    ask: x509.Certificate = field(init=False)
    asvk: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        p = self.product.value.capitalize()
        self.ark_name, self.ask_name, self.asvk_name = (
            name(f"ARK-{p}"), name(f"SEV-{p}"), name(f"SEV-VLEK-{p}"))
        ark_key = rsa_key(0)
        self.ark = sign_cert(self.ark_name, self.ark_name, ark_key.public_key(), ark_key, ca=True)
        self.ask = sign_cert(self.ask_name, self.ark_name, rsa_key(1).public_key(), ark_key,
                             ca=True)
        self.asvk = sign_cert(self.asvk_name, self.ark_name, rsa_key(2).public_key(), ark_key,
                              ca=True)

    @property
    def roots(self) -> list[x509.Certificate]:
        return [self.ark]

    def chain_pem(self, kind: str = "vcek") -> bytes:
        mid = self.ask if kind == "vcek" else self.asvk
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (mid, self.ark))

    def leaf(
        self,
        kind: str = "vcek",
        *,
        tcb: tuple[int, int, int, int] = (3, 0, 8, 115),  # bl, tee, snp, ucode
        fmc: int | None = None,
        hwid: bytes | None = None,
        product_name: str | None = None,
        omit: tuple[str, ...] = (),
        key_slot: int = 0,
        key: object = None,
        not_before: datetime = NOT_BEFORE,
        not_after: datetime = NOT_AFTER,
        pss: bool = True,
        issuer_key: rsa.RSAPrivateKey | None = None,
    ) -> Leaf:
        priv = p384_key(key_slot)
        pub = key if key is not None else priv.public_key()
        bl, tee, snp, ucode = tcb
        exts: dict[str, bytes] = {
            AMD + ".1": der_int(0),
            AMD + ".2": ia5(product_name or f"{self.product.value.capitalize()}-B0"),
            AMD + ".3.1": der_int(bl),
            AMD + ".3.2": der_int(tee),
            AMD + ".3.3": der_int(snp),
            AMD + ".3.8": der_int(ucode),
        }
        if self.product is Product.TURIN:
            exts[AMD + ".3.9"] = der_int(fmc if fmc is not None else 1)
        if kind == "vcek":
            exts[AMD + ".4"] = hwid if hwid is not None else default_chip_id(self.product)[
                : 8 if self.product is Product.TURIN else 64]
        else:
            exts[AMD + ".5"] = ia5("CN=cloud.example")
        for o in omit:
            exts.pop(AMD + o, None)
        issuer = self.ask_name if kind == "vcek" else self.asvk_name
        signer = issuer_key or rsa_key(1 if kind == "vcek" else 2)
        cert = sign_cert(
            name("SEV-VCEK" if kind == "vcek" else "SEV-VLEK"), issuer, pub, signer, ca=False,
            extensions=tuple(_ext(o, v) for o, v in exts.items()), not_before=not_before,
            not_after=not_after, pss=pss,
        )
        return Leaf(cert, priv)


def default_chip_id(product: Product) -> bytes:
    if product is Product.TURIN:
        return bytes(range(0xA0, 0xA8)) + bytes(56)
    return bytes(range(1, 65))


def build_report(
    product: Product = Product.MILAN,
    *,
    version: int = 3,
    policy: int = 0x30000,
    signing_key: int = 0,
    mask_chip_key: bool = False,
    author_key_en: bool = False,
    tcb: tuple[int, int, int, int] = (3, 0, 8, 115),
    fmc: int = 1,
    chip_id: bytes | None = None,
    cpuid: tuple[int, int, int] | None = None,
    measurement: bytes = bytes(range(48)),
    report_data: bytes = bytes(range(100, 164)),
    host_data: bytes = b"\x5a" * 32,
    mit: tuple[int, int] = (0x3, 0x7),
    sig_algo: int = 1,
) -> bytearray:
    """An unsigned report (signature area zero)."""
    r = bytearray(0x4A0)
    le = int.to_bytes
    r[0x000:0x004] = le(version, 4, "little")
    r[0x004:0x008] = le(2, 4, "little")
    r[0x008:0x010] = le(policy, 8, "little")
    r[0x010:0x020] = b"F" * 16
    r[0x020:0x030] = b"I" * 16
    r[0x034:0x038] = le(sig_algo, 4, "little")
    t = tcb_bytes(product, *tcb, fmc=fmc)
    r[0x038:0x040] = t
    r[0x040:0x048] = le(0x25, 8, "little")
    r[0x048:0x04C] = le(int(author_key_en) | int(mask_chip_key) << 1 | signing_key << 2, 4,
                        "little")
    r[0x050:0x090] = report_data
    r[0x090:0x0C0] = measurement
    r[0x0C0:0x0E0] = host_data
    r[0x0E0:0x110] = b"\x11" * 48
    r[0x140:0x160] = b"\x22" * 32
    r[0x180:0x188] = t
    if version >= 3:
        r[0x188:0x18B] = bytes(cpuid if cpuid is not None else CPUID[product])
    if chip_id is None:
        chip_id = bytes(64) if (mask_chip_key or signing_key == 1) else default_chip_id(product)
    r[0x1A0:0x1E0] = chip_id
    r[0x1E0:0x1E8] = t
    r[0x1E8:0x1EB] = bytes([29, 55, 1])
    r[0x1EC:0x1EF] = bytes([29, 55, 1])
    r[0x1F0:0x1F8] = t
    if version >= 5:
        r[0x1F8:0x200] = le(mit[0], 8, "little")
        r[0x200:0x208] = le(mit[1], 8, "little")
    return r


def sign_report(report: bytearray | bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    out = bytearray(report)
    r, s = decode_dss_signature(key.sign(bytes(out[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    out[0x2A0:0x2E8] = r.to_bytes(72, "little")
    out[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(out)

