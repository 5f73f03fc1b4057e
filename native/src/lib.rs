//! meshshield's native data plane, as the Python extension module `meshshield._native`.
//!
//! Rust carries the bytes (listeners, mutual TLS 1.3 with rustls, the relay, timeouts
//! and budgets); Python keeps every trust decision: after each handshake the plane calls
//! the Python peer check once, holding the GIL only for that call. This file is the
//! boundary: it converts between Python and Rust values and never lets a Rust panic or
//! error cross into Python other than as an exception.

pub mod plane;
pub mod relay;
pub mod tls;

use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use plane::{CheckRequest, Direction, Event, Limits, Plane, Verdict};

/// Time spent per peer check: waiting for the GIL, and holding it for the call.
#[derive(Default)]
struct CheckStats {
    count: AtomicU64,
    wait_ns: AtomicU64,
    held_ns: AtomicU64,
}

fn direction(text: &str) -> PyResult<Direction> {
    match text {
        "inbound" => Ok(Direction::Inbound),
        "outbound" => Ok(Direction::Outbound),
        other => Err(PyValueError::new_err(format!(
            "direction {other:?}: expected inbound or outbound"
        ))),
    }
}

fn seconds(value: f64, what: &str) -> PyResult<Option<Duration>> {
    if value == 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(value)
        .map(Some)
        .map_err(|_| PyValueError::new_err(format!("{what} {value}: expected seconds >= 0")))
}

/// The Python callback as the plane's checker:
/// `check(direction, route, peer, der, cipher, id) -> expires_in`, the seconds until the
/// peer certificate expires, or a negative number for a refusal (which Python has
/// listed). A callback that raises, or answers anything else, refuses (fail closed).
fn checker(callback: Py<PyAny>, stats: Arc<CheckStats>) -> plane::Checker {
    Box::new(move |req: CheckRequest| {
        let asked = Instant::now();
        Python::attach(|py| {
            let held = Instant::now();
            let der = PyBytes::new(py, &req.der);
            let answer = callback.call1(
                py,
                (req.direction.as_str(), req.route, req.peer, der, req.cipher, req.id),
            );
            let verdict = match answer.and_then(|a| a.extract::<f64>(py)) {
                Ok(expires_in) if expires_in >= 0.0 => Verdict::Accept {
                    expires_in: Duration::try_from_secs_f64(expires_in).unwrap_or(Duration::MAX),
                },
                Ok(_) => Verdict::Refuse,
                Err(e) => {
                    e.print(py);
                    Verdict::Refuse
                }
            };
            let done = Instant::now();
            stats.count.fetch_add(1, Ordering::Relaxed);
            stats.wait_ns.fetch_add((held - asked).as_nanos() as u64, Ordering::Relaxed);
            stats.held_ns.fetch_add((done - held).as_nanos() as u64, Ordering::Relaxed);
            verdict
        })
    })
}

/// The native data plane of one sidecar.
#[pyclass(frozen, module = "meshshield._native")]
struct DataPlane {
    plane: Plane,
    stats: Arc<CheckStats>,
    wake_fd: Mutex<Option<i32>>,
}

#[pymethods]
impl DataPlane {
    #[new]
    #[pyo3(signature = (*, workers, check, handshake_timeout, connect_timeout, idle_timeout,
                        max_connection_lifetime, max_connections, max_handshakes,
                        max_handshakes_per_source))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        workers: usize,
        check: Py<PyAny>,
        handshake_timeout: f64,
        connect_timeout: f64,
        idle_timeout: f64,
        max_connection_lifetime: f64,
        max_connections: usize,
        max_handshakes: usize,
        max_handshakes_per_source: usize,
    ) -> PyResult<Self> {
        let limits = Limits {
            handshake_timeout: seconds(handshake_timeout, "handshake_timeout")?
                .unwrap_or(Duration::from_secs(10)),
            connect_timeout: seconds(connect_timeout, "connect_timeout")?
                .unwrap_or(Duration::from_secs(5)),
            idle_timeout: seconds(idle_timeout, "idle_timeout")?,
            max_connection_lifetime: seconds(max_connection_lifetime, "max_connection_lifetime")?,
            max_connections,
            max_handshakes,
            max_handshakes_per_source,
        };
        let stats = Arc::new(CheckStats::default());
        let (plane, wake) = Plane::new(workers, limits, checker(check, stats.clone()))
            .map_err(|e| PyOSError::new_err(format!("cannot start the data plane: {e}")))?;
        Ok(DataPlane {
            plane,
            stats,
            wake_fd: Mutex::new(Some(wake.into_raw_fd())),
        })
    }

    /// The descriptor that becomes readable when events wait; handed over once (the
    /// caller owns it from then on).
    fn take_wake_fd(&self) -> PyResult<i32> {
        self.wake_fd
            .lock()
            .map_err(|_| PyOSError::new_err("wake descriptor lock poisoned"))?
            .take()
            .ok_or_else(|| PyValueError::new_err("the wake descriptor was already taken"))
    }

    /// New handshakes present `chain_pem` with `key_pem` and trust exactly
    /// `bundle_pem`; open connections carry on with what they negotiated.
    fn set_identity(&self, chain_pem: &[u8], key_pem: &[u8], bundle_pem: &[u8]) -> PyResult<()> {
        let tls = tls::Tls::build(chain_pem, key_pem, bundle_pem).map_err(PyValueError::new_err)?;
        self.plane.set_tls(tls);
        Ok(())
    }

    /// Listen for one route: inbound (`target` is the app) or outbound (`target` is the
    /// peer sidecar). Answers the bound address.
    fn listen(&self, direction_: &str, route: usize, listen: &str, target: &str) -> PyResult<String> {
        let d = direction(direction_)?;
        self.plane
            .listen(d, route, listen, target)
            .map_err(|e| PyOSError::new_err(format!("cannot listen on {listen}: {e}")))
    }

    fn stop_accepting(&self) {
        self.plane.stop_accepting();
    }

    /// Reset one live connection now; False if it is not live.
    fn close(&self, id: u64) -> bool {
        self.plane.close(id)
    }

    fn close_all(&self) {
        self.plane.close_all();
    }

    /// End one live connection gracefully (clean ends both ways within a grace of 1 s,
    /// else a reset); False if it is not live.
    fn drain(&self, id: u64) -> bool {
        self.plane.drain(id)
    }

    fn drain_all(&self) {
        self.plane.drain_all();
    }

    /// (bytes_in, bytes_out) of a live connection.
    fn bytes(&self, id: u64) -> Option<(u64, u64)> {
        self.plane.bytes(id)
    }

    /// (id, bytes_in, bytes_out) of every live connection.
    fn live(&self) -> Vec<(u64, u64, u64)> {
        self.plane.live()
    }

    /// Events waiting to be taken.
    fn events_waiting(&self) -> usize {
        self.plane.events_waiting()
    }

    fn handshakes_in_progress(&self, direction_: &str) -> PyResult<usize> {
        Ok(self.plane.handshakes_in_progress(direction(direction_)?))
    }

    /// (peer checks, ns waiting for the GIL, ns holding it for the check).
    fn peer_check_stats(&self) -> (u64, u64, u64) {
        (
            self.stats.count.load(Ordering::Relaxed),
            self.stats.wait_ns.load(Ordering::Relaxed),
            self.stats.held_ns.load(Ordering::Relaxed),
        )
    }

    /// Every event since the last call, oldest first, as tuples (taking them gives back
    /// the budget slots they held: see `plane::Event`):
    /// ("refused", direction, route, peer, kind, detail),
    /// ("counted", direction, reason, count): closes coalesced by direction and reason,
    /// ("ended", id, ending, detail, bytes_in, bytes_out),
    /// ("unreachable", id, detail).
    fn take_events<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let mut out = Vec::new();
        for e in self.plane.take_events() {
            let t = match e {
                Event::Refused { direction, route, peer, kind, detail } => {
                    ("refused", direction.as_str(), route, peer, kind, detail).into_pyobject(py)?.into_any()
                }
                Event::Counted { direction, reason, count } => {
                    ("counted", direction.as_str(), reason, count).into_pyobject(py)?.into_any()
                }
                Event::Ended { id, ending, detail, bytes_in, bytes_out } => {
                    ("ended", id, ending.as_str(), detail, bytes_in, bytes_out)
                        .into_pyobject(py)?
                        .into_any()
                }
                Event::Unreachable { id, detail } => {
                    ("unreachable", id, detail).into_pyobject(py)?.into_any()
                }
            };
            out.push(t);
        }
        Ok(out)
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataPlane>()?;
    Ok(())
}
