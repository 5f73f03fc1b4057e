//! Mutual TLS 1.3 for the mesh: one generation of server and client configurations
//! built from the sidecar's certificate chain, its key and the trust bundle.
//!
//! Both sides require the peer's certificate and verify its chain to the bundle with
//! rustls's WebPKI verifiers. The client does not check a host name: a peer sidecar is
//! identified by the SPIFFE ID in its certificate, which the Python peer check decides.

// Memory safety: no `unsafe` here (only the PyO3 binding in lib.rs may need it).
#![forbid(unsafe_code)]

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    ServerConfig, SignatureScheme,
};

/// One generation of TLS configurations; new handshakes take the current one, open
/// connections keep the one they negotiated with.
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
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
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
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
