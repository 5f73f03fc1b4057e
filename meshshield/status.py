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


def _short(text: object, n: int = 12) -> str:
    s = "" if text is None else str(text)
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


def connection_rows(doc: dict[str, Any], now: float) -> list[list[str]]:
    rows = []
    for c in doc.get("connections", []):
        rows.append([
            str(c.get("direction", "?"))[:3],
            str(c.get("peer_spiffe_id", "?")),
            str(c.get("platform", "?")),
            _short(c.get("measurement")),
            "yes" if c.get("simulated") else "no",
            str(c.get("tcb_status", "?")),
            str(c.get("cert_not_after", "?")),
            str(c.get("tls_version", "?")),
            f"{_bytes(c.get('bytes_in'))}/{_bytes(c.get('bytes_out'))}",
            _age(c.get("opened_at"), now),
        ])
    return rows


SIDECAR_HEADERS = ("DIR", "PEER", "PLATFORM", "MEASUREMENT", "SIMULATED", "TCB",
                   "CERT EXPIRES", "TLS", "BYTES IN/OUT", "AGE")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:  # noqa: S310 - operator's URL
        return json.loads(r.read())


def render_sidecar(base: str, now: float | None = None) -> tuple[dict[str, Any], str]:
    st = _get(base + "/status")
    conns = _get(base + "/connections?refused=1")
    now = time.time() if now is None else now
    ident = st.get("identity") or {}
    cas = st.get("cas") or {}
    head = (
        f"{ident.get('spiffe_id', st.get('session', '?') + '/' + st.get('service', '?'))}"
        f"  ready={st.get('ready')}  cert={_short(ident.get('serial'), 16)} until "
        f"{ident.get('not_after', '-')}"
        f"{'  SIMULATED' if ident.get('simulated') else ''}"
        f"  CAS {'reachable' if cas.get('reachable') else 'UNREACHABLE'}  epoch {st.get('epoch')}"
    )
    body = table(SIDECAR_HEADERS, connection_rows(conns, now))
    refused = conns.get("refused", [])
    if refused:
        body += "\n\nrecent refusals:\n" + table(
            ("AT", "DIR", "PEER", "REASON"),
            [[str(r.get("at")), str(r.get("direction"))[:3],
              str(r.get("peer_spiffe_id") or r.get("peer")), str(r.get("reason"))]
             for r in refused[-10:]],
        )
    return {"status": st, **conns}, head + "\n" + body


def edge_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for e in doc.get("edges", []):
        attested = e.get("attested")
        rows.append([
            str(e.get("src", "?")),
            str(e.get("dst", "?")),
            str(e.get("platform") or "?"),
            "√" if attested is True else str(attested),
            str(e.get("since") or "?"),
            _bytes(e.get("bytes")),
        ])
    return rows


EDGE_HEADERS = ("SRC", "DST", "PLATFORM", "ATTESTED", "SINCE", "BYTES")


def fetch_error(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e)
