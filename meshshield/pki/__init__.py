"""meshshield.pki - pure certificate logic: keys, SPIFFE IDs, the claims extension,
CSRs, the CA and its rotation, and private keys sealed at rest. No sockets here."""

from meshshield.pki.ca import (
    CaRecord,
    CaSet,
    CaState,
    cert_pem,
    generate_ca,
    issue_leaf,
    issue_server_cert,
    load_pem_chain,
    normalize_serial,
    serial_hex,
)
from meshshield.pki.claims_ext import (
    CLAIM_KEYS,
    CLAIMS_OID,
    certificate_claims,
    claims_extension,
    claims_from_certificate,
    decode_claims,
    encode_claims,
)
from meshshield.pki.csr import MAX_CSR_BYTES, public_key_from_csr
from meshshield.pki.keys import generate_p256, spki_der, spki_fingerprint
from meshshield.pki.seal import (
    SealedKeyError,
    derive_kek,
    load_or_create_kek,
    seal_private_key,
    unseal_private_key,
)
from meshshield.pki.spiffe import (
    SpiffeId,
    cas_spiffe_id,
    parse_spiffe_id,
    spiffe_id,
    spiffe_id_of,
    trust_domain_id,
    validate_trust_domain,
)

__all__ = [
    "CLAIMS_OID",
    "CLAIM_KEYS",
    "MAX_CSR_BYTES",
    "CaRecord",
    "CaSet",
    "CaState",
    "SealedKeyError",
    "SpiffeId",
    "cas_spiffe_id",
    "cert_pem",
    "certificate_claims",
    "claims_extension",
    "claims_from_certificate",
    "decode_claims",
    "derive_kek",
    "encode_claims",
    "generate_ca",
    "generate_p256",
    "issue_leaf",
    "issue_server_cert",
    "load_or_create_kek",
    "load_pem_chain",
    "normalize_serial",
    "parse_spiffe_id",
    "public_key_from_csr",
    "seal_private_key",
    "serial_hex",
    "spiffe_id",
    "spiffe_id_of",
    "spki_der",
    "spki_fingerprint",
    "trust_domain_id",
    "unseal_private_key",
    "validate_trust_domain",
]
