//! Mutual TLS 1.3 for the mesh: one generation of server and client configurations
//! built from the sidecar's certificate chain, its key and the trust bundle.
//!
//! Both sides require the peer's certificate and verify its chain to the bundle with
//! rustls's WebPKI verifiers. The client does not check a host name: a peer sidecar is
//! identified by the SPIFFE ID in its certificate, which the Python peer check decides.
//!
//! A generation remembers the chains it verified and the peer check then admitted
//! (`Verified`), so a peer that opens many connections with one certificate has its
//! chain's signature checked once per generation, not once per handshake.

// Memory safety: no `unsafe` here (only the PyO3 binding in lib.rs may need it).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};

/// One generation of TLS configurations; new handshakes take the current one, open
/// connections keep the one they negotiated with.
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// The chains this generation's verifiers may take as verified (both directions).
    pub verified: Arc<Verified>,
}

/// The most chains one generation remembers; when full, all are forgotten at once.
const REMEMBERED_MAX: usize = 4096;
/// The longest a chain is remembered, however long its leaf is valid.
const REMEMBERED_FOR: Duration = Duration::from_secs(600);

/// Peer chains this generation verified to its bundle and the peer check then admitted,
/// each with the second (Unix time) from which it must be verified again.
///
/// Verifying a chain checks the CA's signature on the leaf, an ECDSA P-256 verification
/// per handshake, whose answer for the same chain against the same bundle changes only
/// when a certificate's validity ends. So a chain is remembered, by SHA-256 of its
/// certificates as presented, until one second before its leaf's not_after as the peer
/// check read it (at most `REMEMBERED_FOR`), and only once both the verification and
/// the peer check passed. A remembered chain skips the signature and time checks of
/// the chain only: the peer's proof of its key (CertificateVerify) is verified on every
/// handshake, and the peer check decides every connection. A new bundle is a new
/// generation with nothing remembered; an unknown or expired entry is verified in full,
/// so a refusal is the same as without this.
#[derive(Debug, Default)]
pub struct Verified {
    until: Mutex<HashMap<[u8; 32], u64>>,
    reused: AtomicU64,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Verified {
    fn key<'a>(chain: impl Iterator<Item = &'a [u8]>) -> [u8; 32] {
        let mut ctx = ::ring::digest::Context::new(&::ring::digest::SHA256);
        for der in chain {
            // Length-prefixed, so that no two different chains hash the same input.
            ctx.update(&(der.len() as u64).to_be_bytes());
            ctx.update(der);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    fn key_of(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
        Verified::key(std::iter::once(end_entity.as_ref()).chain(intermediates.iter().map(|c| c.as_ref())))
    }

    /// Whether this chain was remembered and still holds at `now`.
    fn holds(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> bool {
        let key = Verified::key_of(end_entity, intermediates);
        let held = self
            .until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .is_some_and(|&until| now.as_secs() < until);
        if held {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        held
    }

    /// Remember `chain` (as the peer presented it, leaf first), whose leaf the peer check
    /// found valid for `valid_for` more.
    pub fn remember(&self, chain: &[CertificateDer<'_>], valid_for: Duration) {
        if chain.is_empty() {
            return;
        }
        let now = SystemTime::now();
        // The second before not_after: rustls compares in whole seconds.
        let until = unix_secs(now + valid_for.min(REMEMBERED_FOR)).saturating_sub(1);
        if until <= unix_secs(now) {
            return;
        }
        let key = Verified::key(chain.iter().map(|c| c.as_ref()));
        let mut map = self.until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.len() >= REMEMBERED_MAX {
            map.clear();
        }
        map.insert(key, until);
    }

    /// Handshakes that took a remembered chain as verified.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }
}

/// ring, with the TLS 1.3 suites in the order the mesh prefers: AES-128-GCM with SHA-256
/// first (a 128-bit security level, as P-256's; fewer AES rounds than AES-256 and a
/// SHA-256 transcript, which x86-64 hashes in hardware, where SHA-384 it does not).
fn provider() -> Arc<CryptoProvider> {
    use ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = ring::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate"));
    }
    Ok(certs)
}

impl Tls {
    /// Configurations presenting `chain_pem` (leaf first) with `key_pem` (PKCS#8) and
    /// trusting exactly the CAs of `bundle_pem`.
    pub fn build(chain_pem: &[u8], key_pem: &[u8], bundle_pem: &[u8]) -> Result<Tls, String> {
        let chain = certs(chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| format!("private key: not a PEM key: {e}"))?;
        let mut roots = RootCertStore::empty();
        for ca in certs(bundle_pem, "trust bundle")? {
            roots
                .add(ca)
                .map_err(|e| format!("trust bundle: unusable CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let verified = Arc::new(Verified::default());
        let client_verifier = Arc::new(ClientVerifier {
            inner: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| format!("client verifier: {e}"))?,
            verified: verified.clone(),
        });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("server configuration: {e}"))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("server certificate: {e}"))?;
        // The mesh's order decides, whatever a client prefers.
        server.ignore_client_order = true;
        // Every connection is a full handshake with a fresh peer check: no tickets.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let verifier = Arc::new(BundleVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
            verified: verified.clone(),
        });
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("client configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("client certificate: {e}"))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
            verified,
        })
    }
}

/// The outbound side's verifier: the server's chain must end at the bundle and its leaf
/// be valid for server authentication; the name is not checked (the peer check decides
/// on the SPIFFE ID).
#[derive(Debug)]
struct BundleVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    verified: Arc<Verified>,
}

impl ServerCertVerifier for BundleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.verified.holds(end_entity, intermediates, now) {
            return Ok(ServerCertVerified::assertion());
        }
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The inbound side's verifier: rustls's WebPKI client verifier (the client's chain must
/// end at the bundle and its leaf be valid for client authentication), skipped for a
/// chain this generation remembers (see `Verified`).
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    verified: Arc<Verified>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.verified.holds(end_entity, intermediates, now) {
            return Ok(ClientCertVerified::assertion());
        }
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why a handshake failed, in the words the Python side turns into reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The peer presented no certificate (or refused ours for want of one).
    Missing,
    /// The peer's certificate has expired.
    Expired,
    /// The peer's chain does not end at the bundle (or the peer did not trust ours).
    Untrusted,
    /// No handshake within the timeout.
    Timeout,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Missing => "missing",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::Untrusted => "untrusted",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

pub fn classify(e: &std::io::Error) -> HandshakeFailure {
    match rustls_error(e) {
        Some(err) => classify_tls(err),
        None => HandshakeFailure::Other,
    }
}

pub fn classify_tls(err: &rustls::Error) -> HandshakeFailure {
    use rustls::Error as E;
    match err {
        E::NoCertificatesPresented => HandshakeFailure::Missing,
        E::AlertReceived(AlertDescription::CertificateRequired) => HandshakeFailure::Missing,
        E::InvalidCertificate(CertificateError::Expired)
        | E::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            HandshakeFailure::Expired
        }
        E::AlertReceived(AlertDescription::CertificateExpired) => HandshakeFailure::Expired,
        E::InvalidCertificate(_)
        | E::AlertReceived(AlertDescription::UnknownCA)
        | E::AlertReceived(AlertDescription::BadCertificate)
        | E::AlertReceived(AlertDescription::UnsupportedCertificate) => HandshakeFailure::Untrusted,
        _ => HandshakeFailure::Other,
    }
}

/// The IANA name of a TLS 1.3 suite, as OpenSSL (and so the Python plane) reports it.
pub fn suite_name(suite: rustls::CipherSuite) -> String {
    let name = format!("{suite:?}");
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name,
    }
}
