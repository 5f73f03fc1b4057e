//! The byte relay of one connection that passed the peer check, and how it ends.
//!
//! Two pumps, one per direction, each with one bounded buffer: a pump reads only when
//! its last chunk has been written, so a slow reader slows its writer (backpressure)
//! instead of filling memory. The rules are those of `meshshield.sidecar.relayrules`:
//! - a clean end of one direction (the app's FIN; the peer's TLS close_notify) becomes a
//!   clean end towards the other side (FIN; close_notify then FIN), and the way back
//!   stays open; when both directions have ended, the connection closes cleanly;
//! - a reset or failed write on either side resets both sides (SO_LINGER 0: an RST, and
//!   no close_notify on the mesh side);
//! - a TCP FIN on the mesh side without close_notify is truncation: both sides reset;
//! - a TLS error after the handshake resets both sides;
//! - an abort on command, the peer certificate's expiry, the idle timeout and the
//!   connection lifetime reset both sides;
//! - a drain (shutdown) ends it gracefully: each direction stops reading, writes what it
//!   holds and ends cleanly (FIN; close_notify then FIN); what has not ended within
//!   `DRAIN_GRACE` is reset.
//!
//! The first way a connection ends is the one it keeps.

// Memory safety: no `unsafe` here (only the PyO3 binding in lib.rs may need it).
#![forbid(unsafe_code)]

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant};

use crate::tls::rustls_error;

/// The most bytes read per direction before they are written on (one chunk in flight).
/// A bulk flow moves CHUNK per pass: each pass costs a wake-up and a system call each
/// way, so a large chunk is what keeps a one-stream transfer from being bound by them.
const CHUNK: usize = 256 * 1024;
/// A direction's first buffer. It doubles (up to CHUNK) each time a read fills it and
/// falls back to this size when a read brings less than a quarter of it (see `size_for`),
/// so an idle or request/response connection holds a few KiB and a bulk one soon reads
/// CHUNK at a time.
const FIRST_CHUNK: usize = 4 * 1024;
/// The most plaintext one TLS record carries.
const RECORD: usize = 16 * 1024;
/// How often an idle connection's byte counts are sampled within one idle period.
const IDLE_SAMPLES: u32 = 4;
/// A timer that never fires in practice (about 30 years).
const FAR: Duration = Duration::from_secs(1 << 30);
/// How long a drained connection may take to end both directions cleanly.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Closed,
    Reset,
    Truncated,
    TlsError,
    Aborted,
    CertificateExpired,
    IdleTimeout,
    MaxConnectionLifetime,
    Drained,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Closed => "closed",
            Ending::Reset => "reset",
            Ending::Truncated => "truncated",
            Ending::TlsError => "tls_error",
            Ending::Aborted => "aborted",
            Ending::CertificateExpired => "certificate_expired",
            Ending::IdleTimeout => "idle_timeout",
            Ending::MaxConnectionLifetime => "max_connection_lifetime",
            Ending::Drained => "drained",
        }
    }
}

/// What Python sees of a live connection and how it ends it.
#[derive(Default)]
pub struct Control {
    /// From the mesh peer towards the app.
    pub bytes_in: AtomicU64,
    /// From the app towards the mesh peer.
    pub bytes_out: AtomicU64,
    pub abort: Notify,
    pub drain: Drain,
}

/// A graceful end asked of a connection (see the module's rules).
#[derive(Default)]
pub struct Drain {
    asked: AtomicBool,
    notify: Notify,
}

impl Drain {
    pub fn ask(&self) {
        self.asked.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Ready once a drain was asked (before or after the call).
    async fn asked(&self) {
        loop {
            // Created before the check: a notify_waiters in between still wakes it.
            let woken = self.notify.notified();
            if self.asked.load(Ordering::SeqCst) {
                return;
            }
            woken.await;
        }
    }
}

impl Control {
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// The timers that end a connection.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Until the peer certificate's not_after.
    pub expires_in: Duration,
    pub idle: Option<Duration>,
    pub lifetime: Option<Duration>,
}

/// Access to the TCP socket under a stream, to reset it.
pub trait TcpOf {
    fn tcp(&self) -> &TcpStream;
}

impl TcpOf for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl TcpOf for tokio_rustls::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl TcpOf for tokio_rustls::TlsStream<ReadAhead> {
    fn tcp(&self) -> &TcpStream {
        &self.get_ref().0.tcp
    }
}

/// The most bytes the mesh socket is read ahead of rustls in one system call.
const AHEAD: usize = 256 * 1024;

/// The mesh side's TCP socket, read ahead of rustls while a bulk flow lasts.
///
/// rustls asks for at most 4 KiB per read, so a 16 KiB record costs several system
/// calls. Once a read fills all the room rustls gave (more is likely waiting), the
/// socket is read up to `AHEAD` bytes at a time into a buffer of its own, which rustls
/// then reads from; when a read brings less than a quarter of that (the flow slowed),
/// the buffer is freed once drained, so an idle connection holds none.
#[derive(Debug)]
pub struct ReadAhead {
    tcp: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    ahead: bool,
}

impl ReadAhead {
    pub fn new(tcp: TcpStream) -> ReadAhead {
        ReadAhead {
            tcp,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            ahead: false,
        }
    }
}

impl std::ops::Deref for ReadAhead {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.tcp
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.end {
            if !this.ahead {
                let (room, before) = (out.remaining(), out.filled().len());
                ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
                this.ahead = room > 0 && out.filled().len() - before == room;
                return Poll::Ready(Ok(()));
            }
            if this.buf.is_empty() {
                this.buf.resize(AHEAD, 0);
            }
            let mut into = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut into))?;
            let n = into.filled().len();
            (this.pos, this.end) = (0, n);
            this.ahead = n >= AHEAD / 4;
        }
        let n = out.remaining().min(this.end - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.end && !this.ahead {
            (this.buf, this.pos, this.end) = (Vec::new(), 0, 0);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Make closing `tcp` send an RST rather than a FIN.
pub fn reset_on_close(tcp: &TcpStream) {
    // Best effort: a socket that is already gone needs no reset.
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Size `buf` for the next read from how much the last one brought: doubled (up to
/// CHUNK) when it filled the buffer, since more is likely waiting; back to FIRST_CHUNK
/// when it brought less than a quarter, since the flow has slowed (a connection that
/// carried a bulk transfer and then goes quiet keeps a few KiB, not CHUNK).
fn size_for(buf: &mut Vec<u8>, last: usize) {
    if last == buf.len() && buf.len() < CHUNK {
        buf.resize((buf.len() * 2).clamp(FIRST_CHUNK, CHUNK), 0);
    } else if buf.len() > FIRST_CHUNK && last < buf.len() / 4 {
        *buf = vec![0; FIRST_CHUNK];
    }
}

/// Read into `buf`, sized first by `size_for`.
async fn read_growing<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, last: usize) -> io::Result<usize> {
    size_for(buf, last);
    r.read(buf).await
}

/// Read into `buf` what `r` has ready, up to its length: at least one byte, or the end,
/// or an error. From rustls one read brings at most one record's plaintext; gathering
/// the records already received lets one write to the app carry them all. An error met
/// after some bytes is `held` and returned by the next call.
async fn read_ready<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    held: &mut Option<io::Error>,
) -> io::Result<usize> {
    if let Some(e) = held.take() {
        return Err(e);
    }
    std::future::poll_fn(|cx| {
        let mut filled = 0;
        while filled < buf.len() {
            let room = buf.len() - filled;
            let mut into = ReadBuf::new(&mut buf[filled..]);
            match Pin::new(&mut *r).poll_read(cx, &mut into) {
                Poll::Ready(Ok(())) => {
                    let got = into.filled().len();
                    filled += got;
                    // Less than a full record: the peer's burst has ended (a reply, not
                    // a bulk flow), and one more read would only find nothing there.
                    if got < room.min(RECORD) {
                        break;
                    }
                }
                Poll::Ready(Err(e)) if filled == 0 => return Poll::Ready(Err(e)),
                Poll::Ready(Err(e)) => {
                    *held = Some(e);
                    break;
                }
                Poll::Pending if filled == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(filled))
    })
    .await
}

/// As `read_growing`, gathering what is ready (see `read_ready`).
async fn read_ready_growing<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    last: usize,
    held: &mut Option<io::Error>,
) -> io::Result<usize> {
    size_for(buf, last);
    read_ready(r, buf, held).await
}

enum Dir {
    Clean,
    End(Ending, String),
}

fn mesh_read_error(e: &io::Error) -> Dir {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return Dir::End(
            Ending::Truncated,
            "TCP FIN from the peer without TLS close_notify (truncation)".into(),
        );
    }
    if let Some(err) = rustls_error(e) {
        let detail = match err {
            rustls::Error::AlertReceived(alert) => format!("{alert:?}").to_lowercase(),
            other => other.to_string(),
        };
        return Dir::End(Ending::TlsError, detail);
    }
    Dir::End(Ending::Reset, format!("mesh side: {e}"))
}

/// The peer's bytes to the app; a close_notify (or a drain) becomes the app's FIN.
async fn mesh_to_app<R, W>(mesh: &mut R, app: &mut W, count: &AtomicU64, drain: &Drain) -> Dir
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut buf, mut n, mut held) = (Vec::new(), 0, None);
    loop {
        let read = tokio::select! {
            biased;
            _ = drain.asked() => break,
            r = read_ready_growing(mesh, &mut buf, n, &mut held) => r,
        };
        n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return mesh_read_error(&e),
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let Err(e) = app.write_all(&buf[..n]).await {
            return Dir::End(Ending::Reset, format!("app side: {e}"));
        }
    }
    match app.shutdown().await {
        Ok(()) => Dir::Clean,
        Err(e) => Dir::End(Ending::Reset, format!("app side: {e}")),
    }
}

/// The app's bytes to the peer; the app's FIN (or a drain) becomes close_notify then FIN.
async fn app_to_mesh<R, W>(app: &mut R, mesh: &mut W, count: &AtomicU64, drain: &Drain) -> Dir
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut buf, mut n) = (Vec::new(), 0);
    loop {
        let read = tokio::select! {
            biased;
            _ = drain.asked() => break,
            r = read_growing(app, &mut buf, n) => r,
        };
        n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Dir::End(Ending::Reset, format!("app side: {e}")),
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        let written = async {
            mesh.write_all(&buf[..n]).await?;
            mesh.flush().await
        };
        if let Err(e) = written.await {
            return Dir::End(Ending::Reset, format!("mesh side: {e}"));
        }
    }
    match mesh.shutdown().await {
        Ok(()) => Dir::Clean,
        Err(e) => Dir::End(Ending::Reset, format!("mesh side: {e}")),
    }
}

/// Carry bytes both ways until the connection ends; both sockets are closed on return
/// (cleanly after a clean end, with a reset otherwise).
pub async fn run<S>(mesh: S, app: TcpStream, ctl: &Control, bounds: Bounds) -> (Ending, String)
where
    S: AsyncRead + AsyncWrite + Unpin + TcpOf,
{
    let (mut mesh_r, mut mesh_w) = tokio::io::split(mesh);
    let (mut app_r, mut app_w) = app.into_split();
    let (ending, detail) = {
        let down = mesh_to_app(&mut mesh_r, &mut app_w, &ctl.bytes_in, &ctl.drain);
        let up = app_to_mesh(&mut app_r, &mut mesh_w, &ctl.bytes_out, &ctl.drain);
        tokio::pin!(down, up);
        let expiry = sleep(bounds.expires_in);
        let lifetime = sleep(bounds.lifetime.unwrap_or(FAR));
        let idle_every = bounds.idle.map(|d| (d / IDLE_SAMPLES).max(Duration::from_millis(10)));
        let idle_tick = sleep(idle_every.unwrap_or(FAR));
        // One waiter for the whole relay (registered now, so a close command that comes
        // between two wake-ups is kept), rather than a new one per wake-up; the same for
        // a drain.
        let abort = ctl.abort.notified();
        let drain = ctl.drain.asked();
        let grace = sleep(FAR);
        tokio::pin!(expiry, lifetime, idle_tick, abort, drain, grace);
        abort.as_mut().enable();
        let mut seen = ctl.bytes();
        let mut quiet_since = Instant::now();
        let (mut down_done, mut up_done) = (false, false);
        let mut draining = false;
        loop {
            tokio::select! {
                // An abort comes first: one issued before the relay started (a trust
                // event while the app was being connected) forwards nothing.
                biased;
                _ = &mut abort => break (Ending::Aborted, "closed on command".into()),
                _ = &mut grace, if draining => {
                    break (Ending::Aborted, "drained, but not ended within the grace".into())
                }
                _ = &mut drain, if !draining => {
                    draining = true;
                    grace.as_mut().reset(Instant::now() + DRAIN_GRACE);
                }
                _ = &mut expiry => {
                    break (Ending::CertificateExpired, "the peer's certificate expired".into())
                }
                _ = &mut lifetime, if bounds.lifetime.is_some() => {
                    break (Ending::MaxConnectionLifetime, "connection lifetime reached".into())
                }
                _ = &mut idle_tick, if bounds.idle.is_some() => {
                    let now = Instant::now();
                    let counts = ctl.bytes();
                    if counts != seen {
                        seen = counts;
                        quiet_since = now;
                    } else if bounds.idle.is_some_and(|limit| now - quiet_since >= limit) {
                        break (Ending::IdleTimeout, "no byte either way".into());
                    }
                    idle_tick.as_mut().reset(now + idle_every.unwrap_or(FAR));
                }
                d = &mut down, if !down_done => match d {
                    Dir::Clean => down_done = true,
                    Dir::End(e, s) => break (e, s),
                },
                u = &mut up, if !up_done => match u {
                    Dir::Clean => up_done = true,
                    Dir::End(e, s) => break (e, s),
                },
            }
            if down_done && up_done {
                if draining {
                    break (Ending::Drained, "ended cleanly on shutdown".into());
                }
                break (Ending::Closed, String::new());
            }
        }
    };
    let mesh = mesh_r.unsplit(mesh_w);
    // Reunited, so that dropping the write half does not send a FIN before the reset.
    let app = app_r.reunite(app_w);
    if !matches!(ending, Ending::Closed | Ending::Drained) {
        reset_on_close(mesh.tcp());
        if let Ok(app) = &app {
            reset_on_close(app);
        }
    }
    drop(mesh);
    drop(app);
    (ending, detail)
}

#[cfg(test)]
mod tests {
    use super::{size_for, CHUNK, FIRST_CHUNK};

    #[test]
    fn a_buffer_grows_while_reads_fill_it_and_falls_back_when_the_flow_slows() {
        let mut buf = Vec::new();
        size_for(&mut buf, 0);
        assert_eq!(buf.len(), FIRST_CHUNK, "the first read gets the first chunk");
        let mut sizes = vec![buf.len()];
        for _ in 0..10 {
            let full = buf.len();
            size_for(&mut buf, full);
            sizes.push(buf.len());
        }
        assert_eq!(sizes[..7], [4096, 8192, 16384, 32768, 65536, 131072, 262144]);
        assert!(sizes.iter().all(|&n| n <= CHUNK), "never past CHUNK: {sizes:?}");
        // A read that brought a quarter or more keeps the size; less falls back.
        size_for(&mut buf, CHUNK / 4);
        assert_eq!(buf.len(), CHUNK);
        size_for(&mut buf, CHUNK / 4 - 1);
        assert_eq!(buf.len(), FIRST_CHUNK);
        // At the first size, a short read keeps it (nothing smaller to fall to).
        size_for(&mut buf, 1);
        assert_eq!(buf.len(), FIRST_CHUNK);
    }
}
