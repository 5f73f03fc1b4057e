"""TLS context helpers shared by the CAS, the sidecar and the CLI."""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path whose content is `data` and which never reaches persistent storage.

    `ssl.SSLContext.load_cert_chain` only reads paths; a memfd gives it one that lives in
    memory (Linux). Elsewhere fall back to a 0600 file in a RAM-backed temp dir.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("meshshield-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    d = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 - RAM-backed
    fd, path = tempfile.mkstemp(dir=d)
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def load_chain_from_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate chain and its private key without writing the key to disk."""
    with _memory_file(chain_pem) as cert_path, _memory_file(key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)


def client_context(bundle_pem: str, *, tls13_only: bool = False) -> ssl.SSLContext:
    """A client context that trusts only the mesh bundle (never the system store)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls13_only else ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=bundle_pem)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
