"""The sidecar's side of secrets: open the envelope, hand the values to the app.

Files go only into a memory-backed folder (tmpfs or ramfs; in Kubernetes an emptyDir
with `medium: Memory`), each written to a temporary name and renamed over the old one,
mode 0400, so the app never reads half a value and a renewal that brings rotated values
replaces them atomically. A folder on persistent disk is refused unless the operator
says, with `--secrets-dir-on-disk`, that this is a development machine.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import secrets as _random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.errors import MeshError, Reason
from meshshield.pki import envelope
from meshshield.pki.ca import load_pem_chain
from meshshield.policy.model import ENV_NAME_PATTERN, FILE_NAME_PATTERN, SECRET_FILE_DIR

log = logging.getLogger("meshshield.sidecar")

MEDIA_TYPE = envelope.MEDIA_TYPE
MAX_ENVELOPE_B64 = (envelope.MAX_ENVELOPE + 2) // 3 * 4
MAX_SECRETS = 64
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
_KINDS = frozenset({"random", "ascii", "x509", "value"})


def _bad(message: str) -> MeshError:
    return MeshError(Reason.SECRETS_ENVELOPE_INVALID, message)


@dataclass(frozen=True)
class ReleasedSecret:
    """One secret as the CAS released it to this service."""

    name: str
    kind: str
    version: int
    value: bytes
    env: str | None
    file: str | None

    @property
    def file_name(self) -> str | None:
        return None if self.file is None else self.file.rsplit("/", 1)[-1]

    def env_value(self) -> str:
        """The value as an environment variable: text as it is, random bytes as hex."""
        if self.kind == "random":
            return self.value.hex()
        try:
            text = self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise MeshError(Reason.SECRET_UNAVAILABLE, f"secret {self.name} is not UTF-8 text "
                            "and cannot be an environment variable; deliver it as a file") from None
        if "\0" in text:
            raise MeshError(Reason.SECRET_UNAVAILABLE, f"secret {self.name} holds a NUL byte "
                            "and cannot be an environment variable; deliver it as a file")
        return text


def open_released(key: ec.EllipticCurvePrivateKey, field: object, spiffe_id: str,
                  serial: str, issuer: ec.EllipticCurvePublicKey) -> tuple[ReleasedSecret, ...]:
    """The `secrets` field of an attest response, checked against the key of the CA that
    issued the answer's certificate (`issuer`), opened with the CSR's private key."""
    if field is None:
        return ()
    if not isinstance(field, dict) or set(field) != {"media_type", "envelope", "signature"}:
        raise _bad('"secrets" must be {"media_type", "envelope", "signature"}')
    if field["media_type"] != MEDIA_TYPE:
        raise _bad(f"secrets media type {str(field['media_type'])[:80]!r}, expected "
                   f"{MEDIA_TYPE}")
    text = field["envelope"]
    if not isinstance(text, str) or len(text) > MAX_ENVELOPE_B64:
        raise _bad(f"secrets envelope must be base64 text of at most {MAX_ENVELOPE_B64} "
                   "characters")
    signature = field["signature"]
    if not isinstance(signature, str) or len(signature) > 256:
        raise _bad("secrets signature must be base64 text of at most 256 characters")
    try:
        blob = base64.b64decode(text, validate=True)
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("secrets envelope or signature is not valid base64") from None
    context = envelope.context_for(spiffe_id, serial)
    try:
        issuer.verify(sig, envelope.signed_message(blob, context), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _bad("secrets envelope is not signed by the CA that issued the certificate "
                   "beside it: it was replaced on the way") from None
    return parse_released(envelope.open_envelope(key, blob, context))


def issuer_key(leaf: x509.Certificate, bundle_pem: str) -> ec.EllipticCurvePublicKey:
    """The public key of the CA in `bundle_pem` that signed `leaf`."""
    for ca in load_pem_chain(bundle_pem):
        if ca.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        public = ca.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            return public
    raise _bad("no CA of the bundle issued the certificate, so the secrets beside it "
               "cannot be checked")


def parse_released(plaintext: bytes) -> tuple[ReleasedSecret, ...]:
    """The envelope's plaintext: {"secrets": [{name, kind, version, value, env?, file?}]}."""
    try:
        doc = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise _bad("secrets envelope plaintext is not JSON") from None
    items = doc.get("secrets") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) > MAX_SECRETS:
        raise _bad(f'secrets envelope must hold {{"secrets": [...]}}, at most {MAX_SECRETS}')
    out = [_released(item, i) for i, item in enumerate(items)]
    for what, values in (("name", [s.name for s in out]),
                         ("env", [s.env for s in out if s.env]),
                         ("file", [s.file for s in out if s.file])):
        if len(set(values)) != len(values):
            raise _bad(f"secrets envelope repeats a {what}")
    return tuple(out)


def _released(item: Any, i: int) -> ReleasedSecret:
    where = f"secrets[{i}]"
    if not isinstance(item, dict) or not {"name", "kind", "version", "value"} <= set(item) or (
        set(item) - {"name", "kind", "version", "value", "env", "file"}
    ):
        raise _bad(f"{where} must be an object with name, kind, version, value, env?, file?")
    name, kind, version, value = item["name"], item["kind"], item["version"], item["value"]
    env, file = item.get("env"), item.get("file")
    if not isinstance(name, str) or not 0 < len(name) <= 63:
        raise _bad(f"{where}.name must be a secret name")
    if kind not in _KINDS:
        raise _bad(f"{where}.kind must be one of {sorted(_KINDS)}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(f"{where}.version must be a positive integer")
    if not isinstance(value, str):
        raise _bad(f"{where}.value must be base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{where}.value is not valid base64") from None
    if env is not None and (not isinstance(env, str) or not ENV_NAME_PATTERN.fullmatch(env)):
        raise _bad(f"{where}.env is not an environment variable name")
    if file is not None:
        folder, _, base = file.rpartition("/") if isinstance(file, str) else ("", "", "")
        if folder != SECRET_FILE_DIR or not FILE_NAME_PATTERN.fullmatch(base):
            raise _bad(f"{where}.file must be a file directly in {SECRET_FILE_DIR}")
    if env is None and file is None:
        raise _bad(f"{where} has neither env nor file")
    return ReleasedSecret(name, str(kind), version, raw, env, file)


def environment(released: Iterable[ReleasedSecret]) -> dict[str, str]:
    return {s.env: s.env_value() for s in released if s.env is not None}


# -- the memory-backed folder ----------------------------------------------------------


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem `path` is on, from /proc/self/mountinfo (Linux)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, found = -1, "unknown"  # the longest mount point holding the path decides
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best:
            kinds = right.split()
            best, found = len(mount), kinds[0] if kinds else "unknown"
    return found


def check_memory_folder(path: Path, *, allow_disk: bool) -> str:
    """Refuse a secrets folder that is not memory-backed (unless `allow_disk`); returns
    the filesystem type. The folder must exist, be a directory and not a symlink."""
    if path.is_symlink() or not path.is_dir():
        raise MeshError(Reason.BAD_REQUEST, f"secrets folder {path} is not a directory (or is "
                                            "a symbolic link); create it, e.g. a tmpfs mount")
    fs = filesystem_type(path) or "unknown"
    if fs not in MEMORY_FILESYSTEMS and not allow_disk:
        raise MeshError(
            Reason.BAD_REQUEST,
            f"secrets folder {path} is on a {fs} filesystem, not in memory (tmpfs or ramfs): "
            "secrets would reach persistent disk. Mount a tmpfs there (in Kubernetes an "
            "emptyDir with medium: Memory), or on a development machine only pass "
            "--secrets-dir-on-disk",
        )
    return fs


Written = dict[str, tuple[int, str]]
"""What a folder holds, by file name: (version, SHA-256 of the contents)."""


def write_secret_files(folder: Path, released: Iterable[ReleasedSecret],
                       previous: Mapping[str, tuple[int, str]] | None = None) -> Written:
    """Write each file secret into `folder` (mode 0400, atomically replaced), skipping
    those whose contents are the ones already written (an x509 secret's certificate is
    issued anew at each attestation, under the same version); what it holds now."""
    written = dict(previous or {})
    wanted = set()
    for s in released:
        base = s.file_name
        if base is None:
            continue
        wanted.add(base)
        digest = hashlib.sha256(s.value).hexdigest()
        if written.get(base) == (s.version, digest):
            continue
        tmp = folder / f".{base}.{_random.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            view = memoryview(s.value)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, folder / base)
        written[base] = (s.version, digest)
    for base in set(written) - wanted:  # the policy no longer gives this secret
        with contextlib.suppress(FileNotFoundError):
            (folder / base).unlink()
        del written[base]
    return written


class SecretFiles:
    """The sidecar's secrets folder: checked once at start, rewritten when values change."""

    def __init__(self, folder: Path, *, allow_disk: bool) -> None:
        self.folder = folder
        self.filesystem = check_memory_folder(folder, allow_disk=allow_disk)
        self.on_disk = self.filesystem not in MEMORY_FILESYSTEMS
        self.written: Written = {}
        self.updates = 0

    def update(self, released: Iterable[ReleasedSecret]) -> None:
        try:
            self.written = write_secret_files(self.folder, released, self.written)
        except OSError as e:
            raise MeshError(Reason.INTERNAL, f"cannot write secrets into {self.folder}: "
                                             f"{e.strerror or e}") from None
        self.updates += 1

    def status(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "filesystem": self.filesystem,
                "on_disk": self.on_disk,
                "files": {name: v for name, (v, _) in sorted(self.written.items())}}


def open_secrets_dir(config: Any) -> SecretFiles:
    """The --secrets-dir of a sidecar config, checked; says where files go and on what."""
    assert config.secrets_dir is not None
    files = SecretFiles(config.secrets_dir, allow_disk=config.secrets_dir_on_disk)
    if files.on_disk:
        log.warning("%s/%s: --secrets-dir %s is on a %s filesystem, NOT in memory "
                    "(--secrets-dir-on-disk): secrets reach persistent disk; development only",
                    config.session, config.service, files.folder, files.filesystem)
    print(f"secrets-dir {files.folder} ({files.filesystem})", flush=True)
    return files
