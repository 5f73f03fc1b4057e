"""`meshshield status`: one sidecar's live connections, or the mesh's edges from the CAS."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from typing import Any

TIMEOUT = 10.0
MAX_RESPONSE_BYTES = 8 << 20


class StatusError(Exception):
    """What a sidecar or CAS sent cannot be shown; the message says why (printable)."""


def clean(text: object) -> str:
    """`text` safe for a terminal: control characters (escape sequences, carriage
    returns, backspaces, bidi overrides) shown escaped, never interpreted."""
    s = "" if text is None else str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def clean_doc(doc: Any) -> Any:
    """A JSON document with every string (keys too) passed through `clean`."""
    if isinstance(doc, dict):
        return {clean(k): clean_doc(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [clean_doc(v) for v in doc]
    if isinstance(doc, str):
        return clean(doc)
    return doc


def _short(text: object, n: int = 12) -> str:
    s = clean(text)
    return s if len(s) <= n else s[:n] + "…"


def _age(opened: object, now: float) -> str:
    try:
        t = datetime.fromisoformat(str(opened).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "?"
    secs = max(0, int(now - t))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


def _bytes(n: object) -> str:
    v = float(n) if isinstance(n, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}GiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), *(fmt.format(*r) for r in rows)])


def _s(v: object) -> str:
    return clean("?" if v is None else v)


def connection_rows(doc: dict[str, Any], now: float) -> list[list[str]]:
    rows = []
    for c in _objs(doc.get("connections")):
        rows.append([
            _s(c.get("direction"))[:3],
            _s(c.get("peer_spiffe_id")),
            _s(c.get("platform")),
            _short(c.get("measurement")),
            "yes" if c.get("simulated") else "no",
            _s(c.get("tcb_status")),
            _s(c.get("cert_not_after")),
            _s(c.get("tls_version")),
            f"{_bytes(c.get('bytes_in'))}/{_bytes(c.get('bytes_out'))}",
            _age(c.get("opened_at"), now),
        ])
    return rows


SIDECAR_HEADERS = ("DIR", "PEER", "PLATFORM", "MEASUREMENT", "SIMULATED", "TCB",
                   "CERT EXPIRES", "TLS", "BYTES IN/OUT", "AGE")


def check_url(url: str, flag: str) -> str:
    """An http(s) URL with a host, or ValueError naming the flag (no file:// reads)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{flag} {clean(url)!r}: expected an http:// or https:// URL, e.g. "
                         "http://127.0.0.1:15000")
    return url.rstrip("/")


def read_capped(r: Any, deadline: float, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """A response body, at most `limit` bytes, all of it before `deadline`."""
    parts: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise StatusError(f"timed out reading the answer (more than {TIMEOUT:g} s)")
        block = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
        if not block:
            return b"".join(parts)
        parts.append(block)
        total += len(block)
        if total > limit:
            raise StatusError(f"the answer is larger than the {limit >> 20} MiB limit")


def decode_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise StatusError("the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise StatusError(f"expected a JSON object, found {type(doc).__name__}")
    return doc


def _get(url: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - checked URL
            return decode_object(read_capped(r, deadline))
    except TimeoutError:
        raise StatusError(f"timed out after {timeout:g} s") from None


def _obj(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _objs(v: object) -> list[dict[str, Any]]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def render_sidecar(base: str, now: float | None = None,
                   timeout: float = TIMEOUT) -> tuple[dict[str, Any], str]:
    """The sidecar's status and connections, every string made safe for a terminal."""
    raw_st = _get(base + "/status", timeout)
    raw_conns = _get(base + "/connections?refused=1", timeout)
    st, conns = clean_doc(raw_st), clean_doc(raw_conns)
    now = time.time() if now is None else now
    ident = _obj(st.get("identity"))
    cas = _obj(st.get("cas"))
    who = ident.get("spiffe_id") or f"{_s(st.get('session'))}/{_s(st.get('service'))}"
    head = (
        f"{_s(who)}"
        f"  ready={_s(st.get('ready'))}  cert={_short(ident.get('serial'), 16)} until "
        f"{_s(ident.get('not_after', '-'))}"
        f"{'  SIMULATED' if ident.get('simulated') else ''}"
        f"  CAS {'reachable' if cas.get('reachable') else 'UNREACHABLE'}"
        f"  epoch {_s(st.get('epoch'))}"
    )
    body = table(SIDECAR_HEADERS, connection_rows(conns, now))
    refused = _objs(conns.get("refused"))
    if refused:
        body += "\n\nrecent refusals:\n" + table(
            ("AT", "DIR", "PEER", "REASON"),
            [[_s(r.get("at")), _s(r.get("direction"))[:3],
              _s(r.get("peer_spiffe_id") or r.get("peer")), _s(r.get("reason"))]
             for r in refused[-10:]],
        )
    return {"status": raw_st, **raw_conns}, head + "\n" + body


def edge_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for e in _objs(clean_doc(doc).get("edges") if isinstance(doc, dict) else None):
        attested = e.get("attested")
        rows.append([
            _s(e.get("src")),
            _s(e.get("dst")),
            _s(e.get("platform") or "?"),
            "√" if attested is True else _s(attested),
            _s(e.get("since") or "?"),
            _bytes(e.get("bytes")),
        ])
    return rows


EDGE_HEADERS = ("SRC", "DST", "PLATFORM", "ATTESTED", "SINCE", "BYTES")


def fetch_error(e: Exception) -> str:
    """One printable line for a failed fetch (never what the peer chose to send raw)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        reason = e.reason
        if isinstance(reason, TimeoutError):
            return "timed out"
        return clean(reason)
    if isinstance(e, TimeoutError):
        return "timed out"
    return clean(e)
