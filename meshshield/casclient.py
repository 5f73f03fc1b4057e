"""A small synchronous client of the CAS API, for the command line."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.adminauth import sign_request
from meshshield.errors import MeshError, Reason
from meshshield.tlsutil import client_context

TIMEOUT = 30.0
MAX_RESPONSE = 16 * 1024 * 1024


class CasUnreachable(Exception):
    pass


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class CasClient:
    def __init__(
        self,
        url: str,
        bundle_path: Path,
        admin_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise ValueError(f"--cas must be an https:// URL, found {url!r}")
        self.base = url.rstrip("/")
        from meshshield.inputs import InputFileError, read_bounded_text

        try:
            bundle = read_bounded_text(bundle_path, what="--cas-bundle", limit=16 << 20)
        except OSError as e:
            raise ValueError(f"cannot read --cas-bundle {bundle_path}: {e.strerror}") from None
        except InputFileError as e:
            raise ValueError(str(e)) from None
        try:
            self.ssl: ssl.SSLContext = client_context(bundle)
        except ssl.SSLError:
            raise ValueError(f"--cas-bundle {bundle_path} holds no PEM certificate") from None
        self.admin_key = admin_key

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        sign: bool = False,
    ) -> Response:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if sign:
            if self.admin_key is None:
                raise ValueError("this command needs --admin-key DIR")
            headers["Authorization"] = sign_request(self.admin_key, method, path, body)
        req = urllib.request.Request(  # noqa: S310 - scheme checked to be https above
            self.base + path, data=body if method != "GET" else None, method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=self.ssl) as r:  # noqa: S310
                return Response(r.status, dict(r.headers.items()), r.read(MAX_RESPONSE))
        except urllib.error.HTTPError as e:
            data = e.read(MAX_RESPONSE)
            try:
                err = json.loads(data)["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                raise MeshError(
                    Reason.BAD_REQUEST, f"CAS answered HTTP {e.code} without an error body"
                ) from None
            try:
                reason = Reason(code)
            except ValueError:
                reason = Reason.BAD_REQUEST
            exc = MeshError(reason, message)
            exc.problems = err.get("problems", [])  # type: ignore[attr-defined]
            raise exc from None
        except urllib.error.URLError as e:
            raise CasUnreachable(f"cannot reach the CAS at {self.base}: {e.reason}") from None
        except (TimeoutError, ConnectionError) as e:
            raise CasUnreachable(f"cannot reach the CAS at {self.base}: {e}") from None

    def post_json(self, path: str, obj: Any, *, sign: bool = False) -> Any:
        return self.request("POST", path, json.dumps(obj).encode(), sign=sign).json()
