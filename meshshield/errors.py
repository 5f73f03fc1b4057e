"""One exception family for every refusal meshshield makes.

Each error carries a stable reason code from the product contract (SPEC §6) and a
human message saying what was expected, what was found and what to do. The same code
goes into logs, HTTP error bodies, metric labels and the sidecar's refusal list, so no
layer invents its own vocabulary.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    SESSION_UNKNOWN = "session_unknown"
    SERVICE_UNKNOWN = "service_unknown"
    PLATFORM_NOT_ALLOWED = "platform_not_allowed"
    SIMULATION_NOT_TOLERATED = "simulation_not_tolerated"
    MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"
    WORKLOAD_NOT_ALLOWED = "workload_not_allowed"
    SIGNER_NOT_ALLOWED = "signer_not_allowed"
    SVN_TOO_LOW = "svn_too_low"
    DEBUG_NOT_TOLERATED = "debug_not_tolerated"
    TCB_OUT_OF_DATE = "tcb_out_of_date"
    TCB_REVOKED = "tcb_revoked"
    TCB_UNKNOWN = "tcb_unknown"
    ADVISORY_NOT_IGNORED = "advisory_not_ignored"
    NONCE_INVALID = "nonce_invalid"
    REPORT_DATA_MISMATCH = "report_data_mismatch"
    EVIDENCE_MALFORMED = "evidence_malformed"
    SIGNATURE_INVALID = "signature_invalid"
    CHAIN_INVALID = "chain_invalid"
    CSR_INVALID = "csr_invalid"
    REVOKED = "revoked"
    PEER_NOT_ALLOWED = "peer_not_allowed"
    CERTIFICATE_MISSING = "certificate_missing"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    PREDECESSOR_MISMATCH = "predecessor_mismatch"
    POLICY_INVALID = "policy_invalid"
    BODY_TOO_LARGE = "body_too_large"
    # A sidecar's connection budgets (SPEC §7): the connection was closed at once.
    OVER_CONNECTION_BUDGET = "over_connection_budget"
    OVER_HANDSHAKE_BUDGET = "over_handshake_budget"
    OVER_HANDSHAKE_BUDGET_PER_SOURCE = "over_handshake_budget_per_source"
    # Why the sidecar ended a connection that had passed the peer check.
    CERTIFICATE_EXPIRED = "certificate_expired"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_CONNECTION_LIFETIME = "max_connection_lifetime"
    # A CAS started without --platform has no evidence of its own to show (SPEC §6).
    CAS_NOT_ATTESTED = "cas_not_attested"
    # Not refusals of a peer but of a request; still part of the error JSON vocabulary.
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INTERNAL = "internal"
    # The CAS's database cannot be reached or used right now (PostgreSQL down or
    # restarting): retry shortly; sidecars keep serving with the certificates they hold.
    STORE_UNAVAILABLE = "store_unavailable"
    # Secrets (policy `secrets:`): a service's secret cannot be released (an uploaded
    # value not yet put, an import its exporter no longer allows), and an envelope of
    # secrets that does not open.
    SECRET_UNAVAILABLE = "secret_unavailable"  # noqa: S105 (a reason code)
    SECRETS_ENVELOPE_INVALID = "secrets_envelope_invalid"


# HTTP status for each reason when it ends a request to the CAS.
HTTP_STATUS: dict[Reason, int] = {
    Reason.SESSION_UNKNOWN: 403,
    Reason.SERVICE_UNKNOWN: 403,
    Reason.PLATFORM_NOT_ALLOWED: 403,
    Reason.SIMULATION_NOT_TOLERATED: 403,
    Reason.MEASUREMENT_NOT_ALLOWED: 403,
    Reason.WORKLOAD_NOT_ALLOWED: 403,
    Reason.SIGNER_NOT_ALLOWED: 403,
    Reason.SVN_TOO_LOW: 403,
    Reason.DEBUG_NOT_TOLERATED: 403,
    Reason.TCB_OUT_OF_DATE: 403,
    Reason.TCB_REVOKED: 403,
    Reason.TCB_UNKNOWN: 403,
    Reason.ADVISORY_NOT_IGNORED: 403,
    Reason.NONCE_INVALID: 403,
    Reason.REPORT_DATA_MISMATCH: 403,
    Reason.EVIDENCE_MALFORMED: 400,
    Reason.SIGNATURE_INVALID: 403,
    Reason.CHAIN_INVALID: 403,
    Reason.CSR_INVALID: 400,
    Reason.REVOKED: 403,
    Reason.PEER_NOT_ALLOWED: 403,
    Reason.CERTIFICATE_MISSING: 401,
    Reason.TLS_HANDSHAKE_FAILED: 400,
    Reason.UNAUTHENTICATED: 401,
    Reason.FORBIDDEN: 403,
    Reason.PREDECESSOR_MISMATCH: 409,
    Reason.POLICY_INVALID: 400,
    Reason.BODY_TOO_LARGE: 413,
    Reason.OVER_CONNECTION_BUDGET: 503,
    Reason.OVER_HANDSHAKE_BUDGET: 503,
    Reason.OVER_HANDSHAKE_BUDGET_PER_SOURCE: 503,
    Reason.CERTIFICATE_EXPIRED: 403,
    Reason.IDLE_TIMEOUT: 408,
    Reason.MAX_CONNECTION_LIFETIME: 408,
    Reason.CAS_NOT_ATTESTED: 404,
    Reason.BAD_REQUEST: 400,
    Reason.NOT_FOUND: 404,
    Reason.CONFLICT: 409,
    Reason.INTERNAL: 500,
    Reason.STORE_UNAVAILABLE: 503,
    Reason.SECRET_UNAVAILABLE: 409,
    Reason.SECRETS_ENVELOPE_INVALID: 400,
}


class MeshError(Exception):
    """A refusal with a reason code and a message for a human.

    The message says what was expected, what was found, and what to do about it.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.reason]

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.reason.value, "message": self.message}}


class EvidenceError(MeshError):
    """Evidence could not be parsed or did not verify (peer-caused)."""


class PolicyError(MeshError):
    """A policy refused something, or a policy document is invalid."""
