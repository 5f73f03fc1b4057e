"""SPIFFE IDs: building them for a service, and parsing them strictly.

A meshshield workload is `spiffe://<trust-domain>/<session>/<service>`; the CAS is
`spiffe://<trust-domain>/cas`; a CA certificate names the bare trust domain
`spiffe://<trust-domain>`.

Parsing follows the SPIFFE ID specification, slightly narrowed: the trust domain is a
lowercase DNS name (labels of a-z, 0-9 and inner hyphens), the path segments use
A-Z a-z 0-9 . - _, and there is no port, user info, query, fragment, percent-encoding,
empty segment, "." or ".." segment, or trailing slash. Anything else is refused with a
ValueError saying what was wrong, because two parsers that disagree about an identity
are an authorization bypass waiting to happen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SpiffeId:
    """A parsed SPIFFE ID. `path_segments` is empty for a trust-domain ID."""

    trust_domain: str
    path_segments: tuple[str, ...]

    @property
    def uri(self) -> str:
        path = "".join("/" + s for s in self.path_segments)
        return f"{SCHEME_PREFIX}{self.trust_domain}{path}"

    def __str__(self) -> str:
        return self.uri


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a lowercase DNS name; raise ValueError otherwise."""
    if not trust_domain:
        raise ValueError("trust domain is empty; expected a DNS name such as mesh.example")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise ValueError(
            f"trust domain is {len(trust_domain)} characters; at most "
            f"{MAX_TRUST_DOMAIN_LENGTH} are allowed"
        )
    if trust_domain != trust_domain.lower():
        raise ValueError(f"trust domain {trust_domain!r} must be lowercase")
    for label in trust_domain.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"trust domain {trust_domain!r} has an invalid label {label!r}: expected "
                "1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
            )
    return trust_domain


def _validate_segment(segment: str, uri: str) -> None:
    if segment == "":
        raise ValueError(f"SPIFFE ID {uri!r} has an empty path segment ('//' or trailing '/')")
    if segment in (".", ".."):
        raise ValueError(f"SPIFFE ID {uri!r} has a {segment!r} path segment")
    if not _SEGMENT.fullmatch(segment):
        raise ValueError(
            f"SPIFFE ID {uri!r} has an invalid path segment {segment!r}: only "
            "A-Z, a-z, 0-9, '.', '-' and '_' are allowed"
        )


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse a SPIFFE ID strictly; raise ValueError naming the problem."""
    if not isinstance(uri, str):
        raise ValueError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
    if len(uri) > MAX_ID_LENGTH:
        raise ValueError(f"SPIFFE ID is {len(uri)} characters; at most {MAX_ID_LENGTH}")
    if not uri.startswith(SCHEME_PREFIX):
        raise ValueError(f"SPIFFE ID {uri!r} must start with {SCHEME_PREFIX!r} (lowercase)")
    rest = uri[len(SCHEME_PREFIX) :]
    for ch, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if ch in rest:
            raise ValueError(f"SPIFFE ID {uri!r} must not contain {what} ({ch!r})")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise ValueError(f"SPIFFE ID {uri!r} must not contain user info ('@')")
    if ":" in authority:
        raise ValueError(f"SPIFFE ID {uri!r} must not contain a port (':')")
    if not authority:
        raise ValueError(f"SPIFFE ID {uri!r} has no trust domain")
    try:
        validate_trust_domain(authority)
    except ValueError as e:
        raise ValueError(f"SPIFFE ID {uri!r}: {e}") from None
    segments: tuple[str, ...] = ()
    if slash:
        segments = tuple(path.split("/"))
        for segment in segments:
            _validate_segment(segment, uri)
    return SpiffeId(authority, segments)


def spiffe_id(trust_domain: str, session: str, service: str) -> str:
    """`spiffe://<trust_domain>/<session>/<service>`, validated."""
    validate_trust_domain(trust_domain)
    for what, segment in (("session", session), ("service", service)):
        if "/" in segment:
            raise ValueError(f"{what} name {segment!r} must not contain '/'")
    return str(parse_spiffe_id(f"{SCHEME_PREFIX}{trust_domain}/{session}/{service}"))


def cas_spiffe_id(trust_domain: str) -> str:
    """The CAS's own identity, `spiffe://<trust_domain>/cas`."""
    return str(parse_spiffe_id(f"{SCHEME_PREFIX}{trust_domain}/cas"))


def trust_domain_id(trust_domain: str) -> str:
    """The trust domain's own ID, `spiffe://<trust_domain>` (a CA's URI SAN)."""
    return str(parse_spiffe_id(f"{SCHEME_PREFIX}{trust_domain}"))


def spiffe_id_of(cert: x509.Certificate) -> str | None:
    """The certificate's SPIFFE ID: its one URI SAN that starts with spiffe://.

    None when there is no such SAN. More than one, or one that does not parse
    strictly, raises ValueError. The prefix is matched case-insensitively so that a
    `SPIFFE://` SAN is refused rather than silently ignored.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = [
        u for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)
        if u[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX
    ]
    if not uris:
        return None
    if len(uris) > 1:
        raise ValueError(
            f"certificate has {len(uris)} SPIFFE URI SANs ({', '.join(uris)}); exactly one "
            "is allowed"
        )
    return str(parse_spiffe_id(uris[0]))
