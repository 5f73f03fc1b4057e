//! Property tests over the bytes a peer controls, bounded in cases (they run in
//! `cargo test`).
//!
//! The crate owns no parser of peer bytes: TLS records, handshake messages and
//! certificates are parsed by rustls and webpki, the peer certificate goes to Python
//! as DER, and the crate reads neither SNI nor ALPN. What it does with peer bytes is
//! its own, though: the first-byte probe, the handshake under its timeout, the
//! classification of a failure into a reason, the event that reports it, and the
//! relay's reading of what follows a handshake. These properties drive that code with
//! arbitrary and mutated bytes through real loopback sockets:
//! - any first flight (random bytes, or a real ClientHello mutated or truncated) ends
//!   in a reported refusal or a counted probe, never a peer check, never a byte or a
//!   connection to the app, and the plane answers with nothing but TLS records;
//! - any bytes injected after a completed handshake end the relay as a TLS error, a
//!   truncation or a reset, with nothing forwarded to the app;
//! - any route target yields a server name (the target is configuration, not peer
//!   bytes, but it is the crate's only string parser).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use _native::plane::{Direction, Event, Limits, Plane, Verdict};
use _native::relay::{self, Bounds, Control, Ending};
use common::{tcp_pair, tls, tls_pair};
use proptest::prelude::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One plane for every case of the first-flight property, with a peer check that must
/// never be called, in front of an app that must never be connected.
struct Inbound {
    plane: Plane,
    addr: String,
    app: TcpListener,
    checks: Arc<AtomicU64>,
}

fn inbound() -> &'static Mutex<Inbound> {
    static INBOUND: OnceLock<Mutex<Inbound>> = OnceLock::new();
    INBOUND.get_or_init(|| {
        let checks = Arc::new(AtomicU64::new(0));
        let counted = checks.clone();
        let limits = Limits {
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: None,
            max_connection_lifetime: None,
            max_connections: 64,
            max_handshakes: 64,
            max_handshakes_per_source: 64,
        };
        let checker = Box::new(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            Verdict::Refuse
        });
        let (plane, _wake) = Plane::new(1, limits, checker).expect("a plane");
        plane.set_tls(tls("server"));
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        app.set_nonblocking(true).unwrap();
        let target = app.local_addr().unwrap().to_string();
        let addr = plane.listen(Direction::Inbound, 0, "127.0.0.1:0", &target).unwrap();
        Mutex::new(Inbound { plane, addr, app, checks })
    })
}

/// A real ClientHello (with a client certificate on offer later), as a peer sends it.
fn client_hello() -> Vec<u8> {
    let config = tls("client").client.clone();
    let name = ServerName::try_from("backend.mesh").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

fn hello() -> &'static [u8] {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO.get_or_init(client_hello)
}

/// Nothing but whole TLS records of a known type (alert, handshake, change cipher
/// spec, application data) with a 3.x version.
fn only_tls_records(mut data: &[u8]) -> bool {
    while !data.is_empty() {
        if data.len() < 5 || !(20..=23).contains(&data[0]) || data[1] != 3 {
            return false;
        }
        let len = u16::from_be_bytes([data[3], data[4]]) as usize;
        if data.len() < 5 + len {
            return false;
        }
        data = &data[5 + len..];
    }
    true
}

fn first_flight(bytes: &[u8]) {
    let guard = inbound().lock().unwrap_or_else(|p| p.into_inner());
    let _ = guard.plane.take_events();
    let mut s = TcpStream::connect(&guard.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The plane may reset before every byte is written: that is a refusal too.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(answer.len() < 64 << 10, "the plane answered {} bytes", answer.len());
    assert!(only_tls_records(&answer), "the plane answered other than TLS: {answer:02x?}");
    // Exactly one refusal or counted probe reports it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while events.is_empty() {
        assert!(Instant::now() < deadline, "no event for a first flight of {} bytes", bytes.len());
        std::thread::sleep(Duration::from_millis(2));
        events = guard.plane.take_events();
    }
    match &events[..] {
        [Event::Refused { kind, detail, .. }] => {
            assert!(
                ["missing", "expired", "untrusted", "timeout", "other"].contains(kind),
                "{kind}: {detail}"
            );
        }
        [Event::Counted { reason: "tls_handshake_failed", count: 1, .. }] => {
            assert!(bytes.is_empty(), "bytes were sent, yet counted as a probe: {events:?}")
        }
        other => panic!("expected one refusal, got {other:?}"),
    }
    assert_eq!(guard.checks.load(Ordering::SeqCst), 0, "a peer check without a handshake");
    assert!(guard.app.accept().is_err(), "the app was connected");
}

fn mutated_hello() -> impl Strategy<Value = Vec<u8>> {
    let n = hello().len();
    (
        prop::collection::vec((0..n, any::<u8>()), 0..8),
        prop_oneof![Just(n), 0..n],
    )
        .prop_map(|(flips, keep)| {
            let mut h = hello().to_vec();
            for (i, b) in flips {
                h[i] = b;
            }
            h.truncate(keep);
            h
        })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Inject `bytes` on the TCP socket under a completed handshake, towards the relay.
async fn after_handshake(bytes: Vec<u8>) -> (Ending, String, u64, Vec<u8>) {
    let server = tls("server");
    let (s, c) = tls_pair(&server, tls("client").client.clone()).await;
    let (mut app, sidecar_app) = tcp_pair().await;
    let ctl = Arc::new(Control::default());
    let ctl2 = ctl.clone();
    let mesh = tokio_rustls::TlsStream::Server(s.expect("handshake"));
    let bounds = Bounds { expires_in: Duration::from_secs(60), idle: None, lifetime: None };
    let relay = tokio::spawn(async move { relay::run(mesh, sidecar_app, &ctl2, bounds).await });
    let mut peer = c.expect("handshake");
    let tcp = peer.get_mut().0;
    let _ = tcp.write_all(&bytes).await;
    let _ = tcp.shutdown().await;
    let (ending, detail) = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("the relay ended")
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut got)).await;
    (ending, detail, ctl.bytes().0, got)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_first_flight_is_refused_and_reaches_nothing(
        bytes in prop_oneof![
            1 => Just(Vec::new()),
            4 => prop::collection::vec(any::<u8>(), 0..2048),
            4 => mutated_hello(),
        ],
    ) {
        first_flight(&bytes);
    }

    #[test]
    fn any_bytes_after_the_handshake_end_the_relay_with_nothing_forwarded(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            // Well-framed application-data records of garbage, as an on-path host forges.
            prop::collection::vec(any::<u8>(), 1..512).prop_map(|body| {
                let mut r = vec![23, 3, 3];
                r.extend_from_slice(&(body.len() as u16).to_be_bytes());
                r.extend_from_slice(&body);
                r
            }),
        ],
    ) {
        let (ending, detail, forwarded, got) = runtime().block_on(after_handshake(bytes));
        prop_assert!(
            matches!(ending, Ending::TlsError | Ending::Truncated | Ending::Reset),
            "{ending:?}: {detail}"
        );
        prop_assert_eq!(forwarded, 0);
        prop_assert!(got.is_empty(), "the app received {} bytes", got.len());
    }

    #[test]
    fn any_route_target_yields_a_server_name(target in "\\PC{0,80}") {
        let _ = _native::plane::server_name(&target);
    }
}
