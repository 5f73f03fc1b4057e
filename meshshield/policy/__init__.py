"""The policy language (SPEC §3): model, YAML parser with line numbers, decisions.

Others code against the names re-exported here.
"""

from meshshield.policy.decide import (
    allows_inbound,
    certificate_standing,
    check_tolerances,
    decide_issuance,
    decide_tee,
)
from meshshield.policy.model import (
    CERT_TTL_DEFAULT_SECONDS,
    CERT_TTL_MAX_SECONDS,
    CERT_TTL_MIN_SECONDS,
    CREATOR,
    IgnoreAdvisories,
    PeerRef,
    Policy,
    Service,
    SevSnpEntry,
    SgxEntry,
    SimEntry,
    SnpTcb,
    TdxEntry,
    TeeEntry,
    Tolerance,
)
from meshshield.policy.parse import (
    MAX_POLICY_BYTES,
    PolicyInvalid,
    Problem,
    parse_policy,
    policy_hash,
)

__all__ = [
    "CERT_TTL_DEFAULT_SECONDS",
    "CERT_TTL_MAX_SECONDS",
    "CERT_TTL_MIN_SECONDS",
    "CREATOR",
    "MAX_POLICY_BYTES",
    "IgnoreAdvisories",
    "PeerRef",
    "Policy",
    "PolicyInvalid",
    "Problem",
    "Service",
    "SevSnpEntry",
    "SgxEntry",
    "SimEntry",
    "SnpTcb",
    "TdxEntry",
    "TeeEntry",
    "Tolerance",
    "allows_inbound",
    "certificate_standing",
    "check_tolerances",
    "decide_issuance",
    "decide_tee",
    "parse_policy",
    "policy_hash",
]
