//! Listeners, handshakes, budgets and the table of live connections.
//!
//! The plane is driven by Python (`meshshield.sidecar.native`) through `lib.rs`: it is
//! told what to listen on, which certificate and bundle to use (new handshakes only),
//! asks Python's peer check once per handshake, and reports what happened (refusals,
//! ended connections, counts) as events Python drains when woken through a socket.
//!
//! Threads: one accepts on every listener and hands each connection to one of the
//! `workers` relay threads (`Relays`), each a single-threaded runtime, where the
//! connection then lives until it ends. On a work-stealing runtime one busy connection's
//! task moved between the workers at its wake-ups (thousands of context switches a
//! second on each of them in a one-stream transfer); pinned, it costs one thread.

// Memory safety: no `unsafe` here (only the PyO3 binding in lib.rs may need it).
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::relay::{self, reset_on_close, Bounds, Control, Ending, ReadAhead};
use crate::tls::{classify, suite_name, HandshakeFailure, Tls};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        }
    }
}

/// The settings of SPEC §7 that bound connections.
#[derive(Debug, Clone)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_connection_lifetime: Option<Duration>,
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
}

/// One peer check asked of Python, after a completed handshake.
pub struct CheckRequest {
    pub direction: Direction,
    pub route: usize,
    /// The peer's address (inbound) or the route's target (outbound).
    pub peer: String,
    pub der: Vec<u8>,
    pub cipher: String,
    /// The connection's id, already live for `Plane::close` while Python decides.
    pub id: u64,
}

pub enum Verdict {
    /// Carry the connection until the peer certificate expires.
    Accept { expires_in: Duration },
    /// Refused (Python has listed the refusal): reset, nothing forwarded.
    Refuse,
}

pub type Checker = Box<dyn Fn(CheckRequest) -> Verdict + Send + Sync>;

/// What Python learns of, in order.
///
/// The queue Python drains is bounded without dropping anything: each refusal, ended
/// or unreachable event holds its connection's budget slot (handshake or established)
/// until Python has taken it, so at most `max_handshakes + max_connections` of them
/// wait per direction. While Python does not drain, the budgets fill and new
/// connections are closed at once, which is counted (`Counted`, one entry per direction
/// and reason however many: a flood coalesces) and reported when Python drains again.
#[derive(Debug)]
pub enum Event {
    /// A handshake or connect that failed before the peer check.
    Refused {
        direction: Direction,
        route: usize,
        peer: String,
        kind: &'static str,
        detail: String,
    },
    /// `count` connections closed at once and counted only (probes, budgets).
    Counted {
        direction: Direction,
        reason: &'static str,
        count: u64,
    },
    /// A connection that passed the peer check has ended.
    Ended {
        id: u64,
        ending: Ending,
        detail: String,
        bytes_in: u64,
        bytes_out: u64,
    },
    /// A connection that passed the peer check found its app unreachable.
    Unreachable { id: u64, detail: String },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The events waiting for Python (see `Event` for why they are bounded).
#[derive(Default)]
struct Events {
    /// Each with the slot it gives back once Python has taken it.
    queue: VecDeque<(Event, Option<Slot>)>,
    /// Closes counted only, coalesced by direction and reason.
    counted: Vec<(Direction, &'static str, u64)>,
}

impl Events {
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.counted.is_empty()
    }
}

#[derive(Default)]
struct BudgetState {
    handshakes: usize,
    established: usize,
    sources: HashMap<IpAddr, usize>,
}

struct Route {
    direction: Direction,
    index: usize,
    /// Inbound: the app's address; outbound: the peer sidecar's.
    target: String,
}

struct Shared {
    limits: Limits,
    tls: RwLock<Option<Arc<Tls>>>,
    conns: Mutex<HashMap<u64, Arc<Control>>>,
    next_id: AtomicU64,
    events: Mutex<Events>,
    wake: UnixStream,
    checker: Checker,
    budgets: [Mutex<BudgetState>; 2],
    stop: watch::Sender<bool>,
    relays: Relays,
}

/// The threads that carry connections: each runs a single-threaded runtime, and a
/// connection lives on one of them from its accept to its end (handshake, peer check,
/// relay), so its wake-ups never move it between threads. A new connection goes to the
/// thread carrying the fewest.
struct Relays {
    handles: Vec<tokio::runtime::Handle>,
    carrying: Vec<AtomicUsize>,
}

impl Relays {
    /// `n` threads, each running until `stop` is dropped (with the plane).
    fn start(n: usize, stop: &watch::Sender<()>) -> io::Result<Relays> {
        let (mut handles, mut carrying) = (Vec::new(), Vec::new());
        for _ in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                // Peer checks wait for the GIL there, one at a time: a few threads suffice.
                .max_blocking_threads(4)
                .thread_name("meshshield-dataplane")
                .enable_io()
                .enable_time()
                .build()?;
            handles.push(rt.handle().clone());
            carrying.push(AtomicUsize::new(0));
            let mut stopped = stop.subscribe();
            std::thread::Builder::new()
                .name("meshshield-dataplane".into())
                .spawn(move || {
                    // Ends when the plane drops its sender; the connections still on this
                    // runtime are dropped with it.
                    rt.block_on(async move {
                        let _ = stopped.changed().await;
                    });
                })?;
        }
        Ok(Relays { handles, carrying })
    }

    fn least_loaded(&self) -> usize {
        (0..self.handles.len())
            .min_by_key(|&i| self.carrying[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// A connection counted on its relay thread until it is dropped, however its task ends.
struct Carried {
    shared: Arc<Shared>,
    relay: usize,
}

impl Carried {
    fn on_least_loaded(shared: &Arc<Shared>) -> Carried {
        let relay = shared.relays.least_loaded();
        shared.relays.carrying[relay].fetch_add(1, Ordering::Relaxed);
        Carried {
            shared: shared.clone(),
            relay,
        }
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        self.shared.relays.carrying[self.relay].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's claim on its direction's budgets, given back when dropped.
struct Slot {
    shared: Arc<Shared>,
    direction: Direction,
    source: IpAddr,
    established: bool,
}

impl Slot {
    fn admit(shared: &Arc<Shared>, direction: Direction, source: IpAddr) -> Result<Slot, &'static str> {
        let limits = &shared.limits;
        let mut b = lock(&shared.budgets[direction.index()]);
        if b.established >= limits.max_connections {
            return Err("over_connection_budget");
        }
        if b.handshakes >= limits.max_handshakes {
            return Err("over_handshake_budget");
        }
        let from_source = b.sources.get(&source).copied().unwrap_or(0);
        // The outbound listeners hear only the local app (one address).
        if direction == Direction::Inbound && from_source >= limits.max_handshakes_per_source {
            return Err("over_handshake_budget_per_source");
        }
        b.handshakes += 1;
        b.sources.insert(source, from_source + 1);
        drop(b);
        Ok(Slot {
            shared: shared.clone(),
            direction,
            source,
            established: false,
        })
    }

    fn drop_handshake(b: &mut BudgetState, source: IpAddr) {
        b.handshakes = b.handshakes.saturating_sub(1);
        let left = b.sources.get(&source).copied().unwrap_or(1).saturating_sub(1);
        if left == 0 {
            b.sources.remove(&source);
        } else {
            b.sources.insert(source, left);
        }
    }

    /// Trade the handshake slot for an established one; false when those are full.
    fn establish(&mut self) -> bool {
        let mut b = lock(&self.shared.budgets[self.direction.index()]);
        if self.established {
            return true;
        }
        if b.established >= self.shared.limits.max_connections {
            return false;
        }
        Slot::drop_handshake(&mut b, self.source);
        b.established += 1;
        self.established = true;
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut b = lock(&self.shared.budgets[self.direction.index()]);
        if self.established {
            b.established = b.established.saturating_sub(1);
        } else {
            Slot::drop_handshake(&mut b, self.source);
        }
    }
}

impl Shared {
    /// Queue `e` for Python, holding `slot` until Python has taken it.
    fn event(&self, e: Event, slot: Option<Slot>) {
        let mut q = lock(&self.events);
        let was_empty = q.is_empty();
        q.queue.push_back((e, slot));
        drop(q);
        self.wake_if(was_empty);
    }

    /// One connection closed at once and counted only.
    fn counted(&self, direction: Direction, reason: &'static str) {
        let mut q = lock(&self.events);
        let was_empty = q.is_empty();
        match q.counted.iter_mut().find(|(d, r, _)| *d == direction && *r == reason) {
            Some(entry) => entry.2 += 1,
            None => q.counted.push((direction, reason, 1)),
        }
        drop(q);
        self.wake_if(was_empty);
    }

    fn wake_if(&self, was_empty: bool) {
        if was_empty {
            // A full socket already holds a wake-up; Python drains the whole queue.
            let _ = (&self.wake).write(&[1]);
        }
    }

    fn refused(&self, route: &Route, peer: String, kind: &'static str, detail: String, slot: Slot) {
        self.event(
            Event::Refused {
                direction: route.direction,
                route: route.index,
                peer,
                kind,
                detail,
            },
            Some(slot),
        );
    }

    fn tls(&self) -> Option<Arc<Tls>> {
        self.tls
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A new live connection, registered before the peer check so that a close
    /// command issued while Python decides (a trust event) is never lost.
    fn register(&self) -> (u64, Arc<Control>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ctl = Arc::new(Control::default());
        lock(&self.conns).insert(id, ctl.clone());
        (id, ctl)
    }

    fn unregister(&self, id: u64) {
        lock(&self.conns).remove(&id);
    }

    fn finish(&self, id: u64, ending: Ending, detail: String, slot: Slot) {
        let ctl = lock(&self.conns).remove(&id);
        let (bytes_in, bytes_out) = ctl.map(|c| c.bytes()).unwrap_or((0, 0));
        self.event(
            Event::Ended {
                id,
                ending,
                detail,
                bytes_in,
                bytes_out,
            },
            Some(slot),
        );
    }

    fn bounds(&self, expires_in: Duration) -> Bounds {
        Bounds {
            expires_in,
            idle: self.limits.idle_timeout,
            lifetime: self.limits.max_connection_lifetime,
        }
    }
}

/// The handle Python holds: a runtime for the listeners, the relay threads (see
/// `Relays`) and what their tasks share.
pub struct Plane {
    rt: Runtime,
    shared: Arc<Shared>,
    /// Dropped with the plane, which ends the relay threads.
    _relays_stop: watch::Sender<()>,
}

impl Plane {
    /// A plane on `workers` threads; the returned socket becomes readable when events
    /// are waiting (`take_events`).
    pub fn new(workers: usize, limits: Limits, checker: Checker) -> io::Result<(Plane, UnixStream)> {
        // The listeners only accept and hand each connection to a relay thread: one
        // thread is plenty for that.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .thread_name("meshshield-dataplane-accept")
            .enable_io()
            .enable_time()
            .build()?;
        let (relays_stop, _) = watch::channel(());
        let relays = Relays::start(workers, &relays_stop)?;
        let (wake, python_end) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        python_end.set_nonblocking(true)?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            limits,
            tls: RwLock::new(None),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            events: Mutex::new(Events::default()),
            wake,
            checker,
            budgets: [Mutex::default(), Mutex::default()],
            stop,
            relays,
        });
        let plane = Plane {
            rt,
            shared,
            _relays_stop: relays_stop,
        };
        Ok((plane, python_end))
    }

    /// New handshakes use `tls` from now on; open connections keep theirs.
    pub fn set_tls(&self, tls: Tls) {
        *self
            .shared
            .tls
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(tls));
    }

    /// Listen on `listen` for one route; answers the bound address.
    pub fn listen(&self, direction: Direction, route: usize, listen: &str, target: &str) -> io::Result<String> {
        let addr = listen
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot resolve {listen}")))?;
        let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.bind(&addr.into())?;
        sock.listen(1024)?;
        sock.set_nonblocking(true)?;
        let _guard = self.rt.enter();
        let listener = TcpListener::from_std(sock.into())?;
        let bound = listener.local_addr()?.to_string();
        let route = Arc::new(Route {
            direction,
            index: route,
            target: target.to_string(),
        });
        self.rt.spawn(accept_loop(self.shared.clone(), listener, route));
        Ok(bound)
    }

    /// Stop accepting on every listener (and close them); open connections carry on.
    pub fn stop_accepting(&self) {
        self.shared.stop.send_replace(true);
    }

    /// End one connection now (a reset each way); false if it is not live.
    pub fn close(&self, id: u64) -> bool {
        match lock(&self.shared.conns).get(&id) {
            Some(ctl) => {
                ctl.abort.notify_one();
                true
            }
            None => false,
        }
    }

    /// End one live connection gracefully (each direction ends cleanly, within
    /// `relay::DRAIN_GRACE`, else it is reset); false if it is not live.
    pub fn drain(&self, id: u64) -> bool {
        match lock(&self.shared.conns).get(&id) {
            Some(ctl) => {
                ctl.drain.ask();
                true
            }
            None => false,
        }
    }

    pub fn drain_all(&self) {
        for ctl in lock(&self.shared.conns).values() {
            ctl.drain.ask();
        }
    }

    pub fn close_all(&self) {
        for ctl in lock(&self.shared.conns).values() {
            ctl.abort.notify_one();
        }
    }

    pub fn bytes(&self, id: u64) -> Option<(u64, u64)> {
        lock(&self.shared.conns).get(&id).map(|c| c.bytes())
    }

    pub fn live(&self) -> Vec<(u64, u64, u64)> {
        lock(&self.shared.conns)
            .iter()
            .map(|(id, c)| {
                let (i, o) = c.bytes();
                (*id, i, o)
            })
            .collect()
    }

    pub fn handshakes_in_progress(&self, direction: Direction) -> usize {
        lock(&self.shared.budgets[direction.index()]).handshakes
    }

    /// Every waiting event, oldest first (the counted closes last); the budget slots
    /// they held are given back.
    pub fn take_events(&self) -> Vec<Event> {
        let Events { queue, counted } = std::mem::take(&mut *lock(&self.shared.events));
        let mut out = Vec::with_capacity(queue.len() + counted.len());
        for (event, slot) in queue {
            out.push(event);
            drop(slot);
        }
        for (direction, reason, count) in counted {
            out.push(Event::Counted { direction, reason, count });
        }
        out
    }

    /// The connections each relay thread carries now (from accept to end).
    pub fn carrying(&self) -> Vec<usize> {
        self.shared
            .relays
            .carrying
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Events waiting for Python (refusals, ended and unreachable connections).
    pub fn events_waiting(&self) -> usize {
        lock(&self.shared.events).queue.len()
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, route: Arc<Route>) {
    let mut stop = shared.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            r = listener.accept() => r,
        };
        let Ok((tcp, addr)) = accepted else {
            // Out of descriptors, say: back off a little rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let slot = match Slot::admit(&shared, route.direction, addr.ip()) {
            Ok(slot) => slot,
            Err(reason) => {
                reset_on_close(&tcp);
                shared.counted(route.direction, reason);
                continue;
            }
        };
        // The refusal's peer, should moving the connection fail (as in `refused` elsewhere).
        let peer = || match route.direction {
            Direction::Inbound => addr.to_string(),
            Direction::Outbound => route.target.clone(),
        };
        // Out of this runtime's reactor, into the relay thread's.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                shared.refused(&route, peer(), HandshakeFailure::Other.as_str(), e.to_string(), slot);
                continue;
            }
        };
        let peer = peer();
        let carried = Carried::on_least_loaded(&shared);
        let (shared, route) = (shared.clone(), route.clone());
        shared.relays.handles[carried.relay].clone().spawn(async move {
            let _carried = carried;
            match TcpStream::from_std(tcp) {
                Ok(tcp) => match route.direction {
                    Direction::Inbound => inbound(shared.clone(), tcp, addr, route, slot).await,
                    Direction::Outbound => outbound(shared.clone(), tcp, route, slot).await,
                },
                Err(e) => {
                    let detail = format!("cannot register the connection: {e}");
                    shared.refused(&route, peer, HandshakeFailure::Other.as_str(), detail, slot)
                }
            }
        });
    }
}

async fn connect(target: &str, limit: Duration) -> io::Result<TcpStream> {
    let addrs = timeout(limit, tokio::net::lookup_host(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("resolving {target} timed out")))??;
    let mut last = None;
    for addr in addrs {
        match timeout(limit, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target} timed out")))
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {target}"))))
}

/// The name a route target gives TLS (no host name is checked: see `tls`).
pub fn server_name(target: &str) -> ServerName<'static> {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("a valid DNS name"))
}

/// The peer certificate and suite of a finished handshake.
fn peer_of(common: &rustls::CommonState) -> (Option<Vec<u8>>, String) {
    let der = common
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.as_ref().to_vec());
    let suite = common
        .negotiated_cipher_suite()
        .map(|s| suite_name(s.suite()))
        .unwrap_or_default();
    (der, suite)
}

/// A chain the handshake verified and the peer check admitted: verified once per
/// generation (see `tls::Verified`).
fn remember(tls: &Tls, common: &rustls::CommonState, expires_in: Duration) {
    if let Some(chain) = common.peer_certificates() {
        tls.verified.remember(chain, expires_in);
    }
}

/// Ask Python's peer check, on a blocking thread (it waits for the GIL); a refused
/// connection is unregistered.
async fn check(shared: &Arc<Shared>, req: CheckRequest) -> Verdict {
    let (sh, id) = (shared.clone(), req.id);
    let verdict = tokio::task::spawn_blocking(move || (sh.checker)(req))
        .await
        .unwrap_or(Verdict::Refuse);
    if matches!(verdict, Verdict::Refuse) {
        shared.unregister(id);
    }
    verdict
}

async fn inbound(shared: Arc<Shared>, tcp: TcpStream, addr: SocketAddr, route: Arc<Route>, mut slot: Slot) {
    let _ = tcp.set_nodelay(true);
    let peer = addr.to_string();
    let Some(tls) = shared.tls() else {
        reset_on_close(&tcp);
        return;
    };
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let timed_out = || "TLS handshake timed out".to_string();
    let mut probe = [0u8; 1];
    match timeout_at(deadline, tcp.peek(&mut probe)).await {
        Err(_) => {
            reset_on_close(&tcp);
            return shared.refused(&route, peer, HandshakeFailure::Timeout.as_str(), timed_out(), slot);
        }
        Ok(Ok(0)) | Ok(Err(_)) => {
            // A TCP probe or port scan: counted, but the refusal list is for peers.
            reset_on_close(&tcp);
            return shared.counted(Direction::Inbound, "tls_handshake_failed");
        }
        Ok(Ok(_)) => {}
    }
    let accept = TlsAcceptor::from(tls.server.clone()).accept(ReadAhead::new(tcp)).into_fallible();
    let stream = match timeout_at(deadline, accept).await {
        Err(_) => {
            return shared.refused(&route, peer, HandshakeFailure::Timeout.as_str(), timed_out(), slot)
        }
        Ok(Err((e, tcp))) => {
            reset_on_close(&tcp);
            return shared.refused(&route, peer, classify(&e).as_str(), e.to_string(), slot);
        }
        Ok(Ok(stream)) => stream,
    };
    let (der, cipher) = peer_of(stream.get_ref().1);
    let Some(der) = der else {
        reset_on_close(stream.get_ref().0);
        return shared.refused(&route, peer, HandshakeFailure::Missing.as_str(), String::new(), slot);
    };
    if !slot.establish() {
        reset_on_close(stream.get_ref().0);
        return shared.counted(Direction::Inbound, "over_connection_budget");
    }
    let (id, ctl) = shared.register();
    let req = CheckRequest {
        direction: Direction::Inbound,
        route: route.index,
        peer,
        der,
        cipher,
        id,
    };
    let Verdict::Accept { expires_in } = check(&shared, req).await else {
        reset_on_close(stream.get_ref().0);
        return;
    };
    remember(&tls, stream.get_ref().1, expires_in);
    let app = match connect(&route.target, shared.limits.connect_timeout).await {
        Ok(app) => app,
        Err(e) => {
            reset_on_close(stream.get_ref().0);
            shared.unregister(id);
            let detail = format!("app at {} unreachable: {e}", route.target);
            return shared.event(Event::Unreachable { id, detail }, Some(slot));
        }
    };
    let bounds = shared.bounds(expires_in);
    let (ending, detail) = relay::run(tokio_rustls::TlsStream::Server(stream), app, &ctl, bounds).await;
    shared.finish(id, ending, detail, slot);
}

async fn outbound(shared: Arc<Shared>, app: TcpStream, route: Arc<Route>, mut slot: Slot) {
    let _ = app.set_nodelay(true);
    let target = route.target.clone();
    let Some(tls) = shared.tls() else {
        reset_on_close(&app);
        return shared.refused(&route, target, "no_identity", String::new(), slot);
    };
    let raw = match connect(&target, shared.limits.connect_timeout).await {
        Ok(raw) => raw,
        Err(e) => {
            reset_on_close(&app);
            return shared.refused(&route, target, "connect", e.to_string(), slot);
        }
    };
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let handshake = TlsConnector::from(tls.client.clone())
        .connect(server_name(&target), ReadAhead::new(raw))
        .into_fallible();
    let stream = match timeout_at(deadline, handshake).await {
        Err(_) => {
            reset_on_close(&app);
            let detail = "TLS handshake timed out".to_string();
            return shared.refused(&route, target, HandshakeFailure::Timeout.as_str(), detail, slot);
        }
        Ok(Err((e, raw))) => {
            reset_on_close(&raw);
            reset_on_close(&app);
            return shared.refused(&route, target, classify(&e).as_str(), e.to_string(), slot);
        }
        Ok(Ok(stream)) => stream,
    };
    let (der, cipher) = peer_of(stream.get_ref().1);
    let refuse = |stream: &tokio_rustls::client::TlsStream<ReadAhead>| {
        reset_on_close(stream.get_ref().0);
        reset_on_close(&app);
    };
    let Some(der) = der else {
        refuse(&stream);
        return shared.refused(&route, target, HandshakeFailure::Missing.as_str(), String::new(), slot);
    };
    if !slot.establish() {
        refuse(&stream);
        return shared.counted(Direction::Outbound, "over_connection_budget");
    }
    let (id, ctl) = shared.register();
    let req = CheckRequest {
        direction: Direction::Outbound,
        route: route.index,
        peer: target,
        der,
        cipher,
        id,
    };
    let Verdict::Accept { expires_in } = check(&shared, req).await else {
        return refuse(&stream);
    };
    remember(&tls, stream.get_ref().1, expires_in);
    let bounds = shared.bounds(expires_in);
    let (ending, detail) = relay::run(tokio_rustls::TlsStream::Client(stream), app, &ctl, bounds).await;
    shared.finish(id, ending, detail, slot);
}
