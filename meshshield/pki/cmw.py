"""The RATS Conceptual Message Wrapper (CMW) X.509 extension, JSON form only.

Source: draft-ietf-rats-msg-wrap ("RATS Conceptual Messages Wrapper (CMW)", the IETF
RATS working group document that becomes the CMW RFC), Section 4.4 "Transporting CMW in
PKIX Formats":

    The CMW extension MUST be identified by the following object identifier:

    id-pe-cmw  OBJECT IDENTIFIER ::=
            { iso(1) identified-organization(3) dod(6) internet(1)
              security(5) mechanisms(5) pkix(7) id-pe(1) 35 }

    This extension SHOULD NOT be marked critical.

    CMW ::= CHOICE {
        json UTF8String,
        cbor OCTET STRING
    }

    The DER-encoded CMW is the value of the OCTET STRING for the extnValue field of
    the extension.

(IANA registered it in "SMI Security for PKIX Certificate Extension", Section 10.7.)
So extnValue holds a DER UTF8String (tag 0x0C) whose text is a JSON CMW, and every arc
of 1.3.6.1.5.5.7.1.35 is small enough for every X.509 stack.

A JSON CMW is either (Section 3.1 "Record CMW") a record `[type, value]` or
`[type, value, ind]`, where `type` is a media type, `value` the conceptual message in
base64url without padding ("This always applies, even if the conceptual message format
is already textual") and `ind` a non-zero bitmap of the message kinds (Section 3.1.1:
bit 2 Evidence, bit 3 Attestation Results); or (Section 3.3 "Collection CMW") an object
of labelled CMWs, at least one, with the optional reserved key `"__cmwc_t"`. We nest no
deeper than one collection of records ("implementations MAY limit the allowed depth of
nesting").

Encoding is our side; decoding takes untrusted bytes and raises `CmwError` (a
ValueError whose message says what is wrong) for anything outside that grammar.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from meshshield.strictjson import no_duplicate_keys

CMW_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.35")  # id-pe-cmw, see the module docstring

# Section 3.1.1 "CM Type": cm-type bit positions of the `ind` bitmap.
IND_EVIDENCE = 1 << 2
IND_ATTESTATION_RESULTS = 1 << 3

COLLECTION_TYPE_KEY = "__cmwc_t"

_TAG_UTF8STRING = 0x0C
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# A media type as RFC 6838 names them: type "/" subtype, restricted-name characters.
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(f"{_RESTRICTED_NAME}/{_RESTRICTED_NAME}")
_LABEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class CmwError(ValueError):
    """A CMW extension value that does not parse; the message names the problem."""


@dataclass(frozen=True)
class CmwRecord:
    """One Record CMW: a media type, the wrapped message's bytes, its kind bitmap."""

    type: str
    value: bytes
    ind: int | None = None

    def __post_init__(self) -> None:
        if not _MEDIA_TYPE.fullmatch(self.type):
            raise ValueError(f"CMW record type {self.type!r} is not a media type")
        if not self.value:
            raise ValueError("CMW record value is empty")  # base64url-string needs 1+ chars
        if self.ind is not None and not 1 <= self.ind < 2**32:
            raise ValueError(f"CMW ind {self.ind} is outside 1..2^32-1")


Cmw = CmwRecord | Mapping[str, CmwRecord]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Strict base64url without padding: the alphabet only, canonical trailing bits."""
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise CmwError("record value is not base64url without padding")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:  # non-zero bits past the last byte: two texts, one value
        raise CmwError("record value is not canonical base64url")
    return data


def _record_json(r: CmwRecord) -> list[Any]:
    out: list[Any] = [r.type, _b64url(r.value)]
    if r.ind is not None:
        out.append(r.ind)
    return out


def encode_cmw_json(cmw: Cmw) -> str:
    """The JSON text of a record, or of a collection of labelled records."""
    if isinstance(cmw, CmwRecord):
        obj: Any = _record_json(cmw)
    else:
        if not cmw:
            raise ValueError("a CMW collection needs at least one entry")
        for label in cmw:
            if not _LABEL.fullmatch(label):
                raise ValueError(f"CMW collection label {label!r} is not [a-z0-9_-]")
        obj = {label: _record_json(r) for label, r in cmw.items()}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def encode_extension_value(cmw: Cmw) -> bytes:
    """extnValue of the CMW extension: DER `CMW ::= CHOICE { json UTF8String, ... }`."""
    text = encode_cmw_json(cmw).encode("utf-8")
    return bytes([_TAG_UTF8STRING]) + _der_length(len(text)) + text


def cmw_extension(cmw: Cmw) -> x509.UnrecognizedExtension:
    """The extension to add, non-critical (Section 4.4: "SHOULD NOT be marked critical")."""
    return x509.UnrecognizedExtension(CMW_OID, encode_extension_value(cmw))


def _der_utf8string(data: bytes) -> bytes:
    """The contents of exactly one DER UTF8String filling `data`."""
    if len(data) < 2:
        raise CmwError(f"value is {len(data)} bytes; too short for a DER CMW")
    if data[0] != _TAG_UTF8STRING:
        if data[0] == 0x04:
            raise CmwError("value is the CBOR CHOICE (OCTET STRING); only JSON CMWs are read")
        raise CmwError(f"value starts with DER tag 0x{data[0]:02x}, expected UTF8String (0x0c)")
    first = data[1]
    if first < 0x80:
        length, start = first, 2
    else:
        n = first & 0x7F
        if n == 0:
            raise CmwError("value uses an indefinite length, which DER forbids")
        if n > 4:
            raise CmwError(f"value declares a {n}-byte length field")
        if len(data) < 2 + n:
            raise CmwError("value is truncated inside its length field")
        length = int.from_bytes(data[2 : 2 + n], "big")
        start = 2 + n
        if length < 0x80 or data[2] == 0:
            raise CmwError("value's length is not minimally encoded, which DER forbids")
    if len(data) - start < length:
        raise CmwError(f"value is truncated: declares {length} bytes, holds {len(data) - start}")
    if len(data) - start > length:
        raise CmwError(f"value has {len(data) - start - length} bytes after the UTF8String")
    return data[start:]


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_record(obj: object, where: str) -> CmwRecord:
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise CmwError(f"{where} is not a JSON record [type, value] or [type, value, ind]")
    kind, value = obj[0], obj[1]
    if not isinstance(kind, str) or not _MEDIA_TYPE.fullmatch(kind):
        raise CmwError(f"{where} type is not a media type")
    if not isinstance(value, str):
        raise CmwError(f"{where} value is not a base64url string")
    ind: int | None = None
    if len(obj) == 3:
        ind = obj[2]
        if not isinstance(ind, int) or isinstance(ind, bool) or not 1 <= ind < 2**32:
            raise CmwError(f"{where} ind is not an integer in 1..2^32-1")
    try:
        return CmwRecord(kind, _unb64url(value), ind)
    except ValueError as e:  # CmwError from the value, or the record's own checks
        raise CmwError(f"{where} {e}") from None


def decode_extension_value(data: bytes, *, max_bytes: int) -> CmwRecord | dict[str, CmwRecord]:
    """Parse the extnValue of a CMW extension: a record, or a collection of records."""
    if len(data) > max_bytes:
        raise CmwError(f"value is {len(data)} bytes; at most {max_bytes} are allowed")
    raw = _der_utf8string(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CmwError(f"UTF8String is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise CmwError(f"UTF8String is not valid JSON ({e})") from None
    if isinstance(obj, list):
        return _parse_record(obj, "record")
    if not isinstance(obj, dict):
        raise CmwError(f"JSON CMW is a {type(obj).__name__}, expected a record or a collection")
    out: dict[str, CmwRecord] = {}
    for label, item in obj.items():
        if label == COLLECTION_TYPE_KEY:
            if not isinstance(item, str):
                raise CmwError(f"collection {COLLECTION_TYPE_KEY} is not a URI or OID string")
            continue
        if isinstance(item, dict):
            raise CmwError(f"collection entry {label!r} is a nested collection; not accepted")
        out[label] = _parse_record(item, f"collection entry {label!r}")
    if not out:
        raise CmwError("collection has no entries")
    return out
