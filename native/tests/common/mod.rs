#![allow(dead_code)]

use std::sync::Arc;

use _native::relay::ReadAhead;
use _native::tls::Tls;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

pub fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn tls(who: &str) -> Tls {
    Tls::build(&data(&format!("{who}.pem")), &data(&format!("{who}.key")), &data("ca.pem"))
        .expect("test material builds")
}

/// A connected pair of TCP sockets on loopback.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// A mesh connection: the server side (as the inbound sidecar holds it) and the client
/// side (the peer sidecar), both with `tls` configurations.
pub async fn tls_pair(
    server_tls: &Tls,
    client_tls: Arc<rustls::ClientConfig>,
) -> (
    std::io::Result<server::TlsStream<ReadAhead>>,
    std::io::Result<client::TlsStream<TcpStream>>,
) {
    let (c, s) = tcp_pair().await;
    let acceptor = TlsAcceptor::from(server_tls.server.clone());
    let connector = TlsConnector::from(client_tls);
    // An IP address the certificates do not name: no host name is checked.
    let name = ServerName::try_from("127.0.0.1").unwrap();
    // The server side reads its socket as the plane does (ahead of rustls in a bulk flow).
    tokio::join!(acceptor.accept(ReadAhead::new(s)), connector.connect(name, c))
}

/// Client configuration presenting `who`'s chain but trusting the mesh CA and the foreign
/// one alike (so only the server's verdict on our certificate matters).
pub fn tls_with_own_trust(who: &str) -> Arc<rustls::ClientConfig> {
    let mut bundle = data("ca.pem");
    bundle.extend(data("foreign.pem"));
    Tls::build(&data(&format!("{who}.pem")), &data(&format!("{who}.key")), &bundle)
        .expect("test material builds")
        .client
}

pub fn tls_with_own_trust_server(who: &str) -> Tls {
    let mut bundle = data("ca.pem");
    bundle.extend(data("foreign.pem"));
    Tls::build(&data(&format!("{who}.pem")), &data(&format!("{who}.key")), &bundle)
        .expect("test material builds")
}

/// A client-side verifier that accepts any server (for a client without a certificate).
#[derive(Debug)]
pub struct AnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
