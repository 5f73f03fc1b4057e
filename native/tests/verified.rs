//! A TLS generation remembers the peer chains it verified and the peer check admitted
//! (`tls::Verified`): what is skipped for them, and what never is.

mod common;

use std::sync::Arc;
use std::time::Duration;

use _native::tls::{classify, HandshakeFailure};
use common::{tls, tls_pair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const HOUR: Duration = Duration::from_secs(3600);

/// One handshake between `server` and `client`, both sides' chains remembered when
/// `admit` (as the plane does once the peer check has admitted them).
async fn handshake(server: &_native::tls::Tls, client: &_native::tls::Tls, admit: Option<Duration>) {
    let (s, c) = tls_pair(server, client.client.clone()).await;
    let (s, c) = (s.expect("server side"), c.expect("client side"));
    if let Some(valid_for) = admit {
        server.verified.remember(s.get_ref().1.peer_certificates().unwrap(), valid_for);
        client.verified.remember(c.get_ref().1.peer_certificates().unwrap(), valid_for);
    }
}

#[tokio::test]
async fn an_admitted_chain_is_verified_once_per_generation() {
    let (server, client) = (tls("server"), tls("client"));
    handshake(&server, &client, None).await;
    assert_eq!((server.verified.reused(), client.verified.reused()), (0, 0), "nothing remembered yet");
    handshake(&server, &client, Some(HOUR)).await;
    assert_eq!((server.verified.reused(), client.verified.reused()), (0, 0), "verified in full, then remembered");
    handshake(&server, &client, None).await;
    handshake(&server, &client, None).await;
    assert_eq!((server.verified.reused(), client.verified.reused()), (2, 2), "both sides took it as verified");
    // A new generation (a new bundle, say) remembers nothing of the old one.
    let (server2, client2) = (tls("server"), tls("client"));
    handshake(&server2, &client2, None).await;
    assert_eq!((server2.verified.reused(), client2.verified.reused()), (0, 0));
}

#[tokio::test]
async fn a_chain_valid_for_less_than_a_second_is_not_remembered() {
    let (server, client) = (tls("server"), tls("client"));
    handshake(&server, &client, Some(Duration::from_millis(900))).await;
    handshake(&server, &client, Some(Duration::ZERO)).await;
    handshake(&server, &client, None).await;
    assert_eq!((server.verified.reused(), client.verified.reused()), (0, 0));
}

#[tokio::test]
async fn other_chains_are_still_verified_and_refused() {
    let (server, client) = (tls("server"), tls("client"));
    handshake(&server, &client, Some(HOUR)).await;
    for (who, expected) in [("foreign", HandshakeFailure::Untrusted), ("expired", HandshakeFailure::Expired)] {
        let (s, _c) = tls_pair(&server, common::tls_with_own_trust(who)).await;
        assert_eq!(classify(&s.expect_err("refused")), expected, "{who}");
    }
    assert_eq!(server.verified.reused(), 0);
}

/// Presents `chain_of`'s certificates but signs with `key_of`'s key.
#[derive(Debug)]
struct Impostor(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Impostor {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_remembered_chain_without_its_key_is_refused() {
    let (server, client) = (tls("server"), tls("client"));
    handshake(&server, &client, Some(HOUR)).await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&common::data("client.pem")).map(Result::unwrap).collect();
    let other_key = PrivateKeyDer::from_pem_slice(&common::data("foreign.key")).unwrap();
    let signer = rustls::crypto::ring::sign::any_supported_type(&other_key).unwrap();
    let impostor = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(common::AnyServer(provider)))
        .with_client_cert_resolver(Arc::new(Impostor(Arc::new(rustls::sign::CertifiedKey::new(chain, signer)))));
    let (s, _c) = tls_pair(&server, Arc::new(impostor)).await;
    let err = s.expect_err("the proof of possession fails");
    assert!(err.to_string().to_lowercase().contains("signature"), "{err}");
    assert_eq!(server.verified.reused(), 1, "the chain was taken as verified, the key was not");
}
