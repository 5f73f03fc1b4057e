//! The plane as Python drives it, over real loopback sockets: the event queue towards
//! Python is bounded by the budgets and a flood while Python does not drain is counted,
//! never dropped silently.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use _native::plane::{Direction, Event, Limits, Plane, Verdict};
use common::tls;

fn limits(max_handshakes: usize) -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        idle_timeout: None,
        max_connection_lifetime: None,
        max_connections: 16,
        max_handshakes,
        max_handshakes_per_source: 1000,
    }
}

fn wait_for(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An HTTP request where a ClientHello belongs: a refusal. A connection over budget
/// may be reset before the request is written.
fn garbage(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n");
    s
}

#[test]
fn events_wait_within_the_budgets_and_a_flood_meanwhile_is_counted() {
    let (plane, _wake) = Plane::new(1, limits(2), Box::new(|_| Verdict::Refuse)).unwrap();
    plane.set_tls(tls("server"));
    let addr = plane.listen(Direction::Inbound, 0, "127.0.0.1:0", "127.0.0.1:9").unwrap();
    // Python does not drain: the first two refusals wait, holding the handshake budget.
    let mut held = vec![garbage(&addr), garbage(&addr)];
    wait_for("two refusals to wait", || plane.events_waiting() == 2);
    for _ in 0..30 {
        held.push(garbage(&addr));
    }
    // Give the plane time to take in what it will: nothing more may wait.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(plane.events_waiting(), 2);
    assert_eq!(plane.handshakes_in_progress(Direction::Inbound), 2);
    let events = plane.take_events();
    let refused = events.iter().filter(|e| matches!(e, Event::Refused { .. })).count();
    let counted: u64 = events
        .iter()
        .map(|e| match e {
            Event::Counted { reason: "over_handshake_budget", count, .. } => *count,
            _ => 0,
        })
        .sum();
    assert_eq!((refused, counted), (2, 30), "{events:?}");
    // Taking the events gave the budget back: the next refusal is listed again.
    assert_eq!(plane.handshakes_in_progress(Direction::Inbound), 0);
    held.push(garbage(&addr));
    wait_for("the next refusal", || plane.events_waiting() == 1);
    match &plane.take_events()[..] {
        [Event::Refused { direction: Direction::Inbound, kind, .. }] => assert_eq!(*kind, "other"),
        other => panic!("expected one refusal, got {other:?}"),
    }
}

#[test]
fn connections_are_spread_over_the_relay_threads_and_each_is_given_back_when_it_ends() {
    let (plane, _wake) = Plane::new(2, limits(8), Box::new(|_| Verdict::Refuse)).unwrap();
    plane.set_tls(tls("server"));
    let addr = plane.listen(Direction::Inbound, 0, "127.0.0.1:0", "127.0.0.1:9").unwrap();
    assert_eq!(plane.carrying(), vec![0, 0]);
    // Connections that send nothing wait for their first flight, each on its thread.
    let mut held = Vec::new();
    for n in 1..=4 {
        held.push(TcpStream::connect(&addr).unwrap());
        wait_for("the connection to be carried", || plane.carrying().iter().sum::<usize>() == n);
    }
    assert_eq!(plane.carrying(), vec![2, 2], "each went to the thread carrying fewer");
    // One ends: the next connection goes where it left room.
    drop(held.remove(0));
    wait_for("the closed one to be given back", || plane.carrying().iter().sum::<usize>() == 3);
    held.push(TcpStream::connect(&addr).unwrap());
    wait_for("the next one to be carried", || plane.carrying().iter().sum::<usize>() == 4);
    assert_eq!(plane.carrying(), vec![2, 2]);
    drop(held);
    wait_for("every connection to be given back", || plane.carrying() == vec![0, 0]);
}
