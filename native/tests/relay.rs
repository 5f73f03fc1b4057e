//! The relay's rules over real loopback sockets and real TLS 1.3.

mod common;

use std::sync::Arc;
use std::time::Duration;

use _native::relay::{self, reset_on_close, Bounds, Control, Ending};
use _native::tls::{classify, suite_name, HandshakeFailure};
use common::{tcp_pair, tls, tls_pair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client;

const LONG: Bounds = Bounds {
    expires_in: Duration::from_secs(3600),
    idle: None,
    lifetime: None,
};

struct Setup {
    /// The peer sidecar's end of the mesh connection.
    peer: client::TlsStream<TcpStream>,
    /// The app's end of the plaintext connection.
    app: TcpStream,
    ctl: Arc<Control>,
    relay: JoinHandle<(Ending, String)>,
}

async fn setup(bounds: Bounds) -> Setup {
    let server = tls("server");
    let (s, c) = tls_pair(&server, tls("client").client.clone()).await;
    let (app, sidecar_app) = tcp_pair().await;
    let ctl = Arc::new(Control::default());
    let ctl2 = ctl.clone();
    let mesh = tokio_rustls::TlsStream::Server(s.expect("handshake"));
    let relay = tokio::spawn(async move { relay::run(mesh, sidecar_app, &ctl2, bounds).await });
    Setup {
        peer: c.expect("handshake"),
        app,
        ctl,
        relay,
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn read_to_end_or_error<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn bytes_pass_exactly_both_ways_and_half_close_from_the_peer() {
    let Setup { mut peer, mut app, ctl, relay } = setup(LONG).await;
    let down = pattern(5 << 20, 7);
    let up = pattern(3 << 20, 11);
    let (mut app_r, mut app_w) = app.split();
    let (mut peer_r, mut peer_w) = tokio::io::split(&mut peer);
    let send_down = async {
        peer_w.write_all(&down).await.unwrap();
        peer_w.shutdown().await.unwrap(); // close_notify then FIN
    };
    let recv_down = async { read_to_end_or_error(&mut app_r).await.unwrap() };
    let (_, got_down) = tokio::join!(send_down, recv_down);
    assert!(got_down == down, "the app received other bytes");
    // The way back is still open after the peer's half-close.
    let send_up = async {
        app_w.write_all(&up).await.unwrap();
        app_w.shutdown().await.unwrap();
    };
    let recv_up = async { read_to_end_or_error(&mut peer_r).await.unwrap() };
    let (_, got_up) = tokio::join!(send_up, recv_up);
    assert!(got_up == up, "the peer received other bytes");
    let (ending, _) = relay.await.unwrap();
    assert_eq!(ending, Ending::Closed);
    assert_eq!(ctl.bytes(), (down.len() as u64, up.len() as u64));
}

#[tokio::test]
async fn half_close_from_the_app_keeps_the_way_in_open() {
    let Setup { mut peer, mut app, relay, .. } = setup(LONG).await;
    app.write_all(b"banner\n").await.unwrap();
    app.shutdown().await.unwrap();
    let got = read_to_end_or_error(&mut peer).await.unwrap();
    assert_eq!(got, b"banner\n", "a clean end (close_notify) after the banner");
    peer.write_all(b"still heard").await.unwrap();
    peer.shutdown().await.unwrap();
    assert_eq!(read_to_end_or_error(&mut app).await.unwrap(), b"still heard");
    assert_eq!(relay.await.unwrap().0, Ending::Closed);
}

#[tokio::test]
async fn an_app_reset_reaches_the_peer_as_a_reset() {
    let Setup { mut peer, app, relay, .. } = setup(LONG).await;
    reset_on_close(&app);
    drop(app);
    let (ending, _) = relay.await.unwrap();
    assert_eq!(ending, Ending::Reset);
    let err = read_to_end_or_error(&mut peer).await.expect_err("not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn a_peer_reset_reaches_the_app_as_a_reset() {
    let Setup { peer, mut app, relay, .. } = setup(LONG).await;
    reset_on_close(peer.get_ref().0);
    drop(peer);
    assert_eq!(relay.await.unwrap().0, Ending::Reset);
    let err = read_to_end_or_error(&mut app).await.expect_err("not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn a_fin_without_close_notify_is_truncation_and_resets_the_app() {
    let Setup { mut peer, mut app, relay, .. } = setup(LONG).await;
    peer.write_all(b"part of a response").await.unwrap();
    peer.flush().await.unwrap();
    // A FIN on the TCP socket under TLS, as an on-path host could forge one.
    peer.get_mut().0.shutdown().await.unwrap();
    let (ending, detail) = relay.await.unwrap();
    assert_eq!(ending, Ending::Truncated, "{detail}");
    let mut buf = vec![0u8; 64];
    let mut got = Vec::new();
    let err = loop {
        match app.read(&mut buf).await {
            Ok(0) => panic!("the app saw a clean end after {got:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn an_abort_on_command_resets_both_sides() {
    let Setup { mut peer, mut app, ctl, relay } = setup(LONG).await;
    ctl.abort.notify_one();
    assert_eq!(relay.await.unwrap().0, Ending::Aborted);
    assert!(read_to_end_or_error(&mut app).await.is_err());
    assert!(read_to_end_or_error(&mut peer).await.is_err());
}

#[tokio::test]
async fn the_peer_certificate_expiry_and_idle_timeout_end_a_connection() {
    let s = setup(Bounds { expires_in: Duration::from_millis(200), ..LONG }).await;
    assert_eq!(s.relay.await.unwrap().0, Ending::CertificateExpired);
    let idle = Bounds { idle: Some(Duration::from_millis(200)), ..LONG };
    let Setup { mut peer, mut app, relay, .. } = setup(idle).await;
    peer.write_all(b"x").await.unwrap();
    peer.flush().await.unwrap();
    let mut one = [0u8; 1];
    app.read_exact(&mut one).await.unwrap();
    assert_eq!(relay.await.unwrap().0, Ending::IdleTimeout);
    let lifetime = Bounds { lifetime: Some(Duration::from_millis(100)), ..LONG };
    assert_eq!(setup(lifetime).await.relay.await.unwrap().0, Ending::MaxConnectionLifetime);
}

#[tokio::test]
async fn a_slow_reader_bounds_what_is_buffered() {
    let Setup { peer, app, ctl, .. } = setup(LONG).await;
    let (_peer_r, mut peer_w) = tokio::io::split(peer);
    let writer = tokio::spawn(async move {
        let block = vec![0u8; 64 * 1024];
        loop {
            if peer_w.write_all(&block).await.is_err() {
                break;
            }
        }
    });
    // The app reads nothing: after the socket buffers fill, the relay stops reading.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let (now, _) = ctl.bytes();
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let (stalled, _) = ctl.bytes();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ctl.bytes().0, stalled, "the relay kept reading for a reader that does not read");
    assert!(stalled < 64 << 20, "{stalled} bytes taken in for a stalled app");
    writer.abort();
    drop(app);
}

#[tokio::test]
async fn handshake_failures_are_classified() {
    let server = tls("server");
    // No client certificate.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anonymous = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(common::AnyServer(provider)))
        .with_no_client_auth();
    let (s, _c) = tls_pair(&server, Arc::new(anonymous)).await;
    assert_eq!(classify(&s.expect_err("refused")), HandshakeFailure::Missing);
    for (who, expected) in [("foreign", HandshakeFailure::Untrusted), ("expired", HandshakeFailure::Expired)] {
        let client = common::tls_with_own_trust(who);
        let (s, _c) = tls_pair(&server, client).await;
        assert_eq!(classify(&s.expect_err("refused")), expected, "{who}");
    }
    // And on the outbound side: a server of a foreign CA.
    let foreign = common::tls_with_own_trust_server("foreign");
    let (_s, c) = tls_pair(&foreign, tls("client").client.clone()).await;
    assert_eq!(classify(&c.expect_err("refused")), HandshakeFailure::Untrusted);
}

#[test]
fn suites_are_named_as_openssl_names_them() {
    assert_eq!(suite_name(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384), "TLS_AES_256_GCM_SHA384");
}

#[tokio::test]
async fn the_mesh_negotiates_aes_128_gcm_whatever_the_client_prefers() {
    let server = tls("server");
    let (s, c) = tls_pair(&server, tls("client").client.clone()).await;
    let suite = |common: &rustls::CommonState| common.negotiated_cipher_suite().map(|s| s.suite());
    assert_eq!(suite(s.unwrap().get_ref().1), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    assert_eq!(suite(c.unwrap().get_ref().1), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    // A client listing AES-256 first (as OpenSSL's does) still gets the server's choice.
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let provider = std::sync::Arc::new(provider);
    let chain = CertificateDer::pem_slice_iter(&common::data("client.pem")).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(&common::data("client.key")).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(common::AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let (s, c) = tls_pair(&server, std::sync::Arc::new(client)).await;
    assert!(c.is_ok());
    assert_eq!(suite(s.unwrap().get_ref().1), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
}

#[test]
fn unusable_material_is_an_error_not_a_panic() {
    use _native::tls::Tls;
    assert!(Tls::build(b"", b"", b"").is_err());
    assert!(Tls::build(&common::data("server.pem"), b"garbage", &common::data("ca.pem")).is_err());
    assert!(Tls::build(&common::data("server.pem"), &common::data("client.key"), &common::data("ca.pem")).is_err());
}

#[tokio::test]
async fn an_abort_issued_before_the_relay_starts_forwards_nothing() {
    let server = tls("server");
    let (s, c) = tls_pair(&server, tls("client").client.clone()).await;
    let mut peer = c.unwrap();
    peer.write_all(b"GET /secret").await.unwrap();
    peer.flush().await.unwrap();
    let (mut app, sidecar_app) = tcp_pair().await;
    let ctl = Control::default();
    ctl.abort.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await; // the bytes are there to read
    let mesh = tokio_rustls::TlsStream::Server(s.unwrap());
    let (ending, _) = relay::run(mesh, sidecar_app, &ctl, LONG).await;
    assert_eq!(ending, Ending::Aborted);
    assert_eq!(ctl.bytes(), (0, 0));
    let mut buf = [0u8; 64];
    assert!(matches!(app.read(&mut buf).await, Err(_) | Ok(0)), "bytes reached the app");
}

#[tokio::test]
async fn a_drain_ends_both_directions_cleanly_after_what_was_in_flight() {
    let Setup { mut peer, mut app, ctl, relay } = setup(LONG).await;
    peer.write_all(b"before the drain").await.unwrap();
    peer.flush().await.unwrap();
    let mut got = [0u8; 16];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before the drain");
    ctl.drain.ask();
    assert_eq!(relay.await.unwrap().0, Ending::Drained);
    // Clean ends both ways: the app reads EOF, the peer close_notify then EOF.
    assert_eq!(read_to_end_or_error(&mut app).await.unwrap(), b"");
    assert_eq!(read_to_end_or_error(&mut peer).await.unwrap(), b"");
    assert_eq!(ctl.bytes(), (16, 0));
}

#[tokio::test]
async fn a_drained_connection_that_cannot_end_within_the_grace_is_reset() {
    let Setup { peer, app, ctl, relay } = setup(LONG).await;
    // The app reads nothing, so the mesh-to-app direction cannot end: the peer's bytes
    // fill the app's socket buffers and the pump's chunk waits to be written.
    let (_peer_r, mut peer_w) = tokio::io::split(peer);
    let flood = tokio::spawn(async move {
        let block = vec![7u8; 64 * 1024];
        while peer_w.write_all(&block).await.is_ok() {}
    });
    // Until the relay has stopped taking bytes in (the app's buffers are full).
    let filling = std::time::Instant::now();
    let mut seen = 0;
    while filling.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = ctl.bytes().0;
        if now > 0 && now == seen {
            break;
        }
        seen = now;
    }
    let asked = std::time::Instant::now();
    ctl.drain.ask();
    let (ending, detail) = relay.await.unwrap();
    assert_eq!(ending, Ending::Aborted, "{detail}");
    assert!(detail.contains("grace"), "{detail}");
    let took = asked.elapsed();
    assert!(took >= relay::DRAIN_GRACE && took < relay::DRAIN_GRACE * 3, "{took:?}");
    flood.abort();
    drop(app);
}
