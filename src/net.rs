//! The listener: accepts TCP connections and prepares them for streams that
//! stay open for hours. Each connection gets TCP keepalive and a user timeout (so a
//! viewer that vanished without closing is found), and a write-stall guard: a viewer
//! that accepts no bytes at all for `stall_limit` is disconnected. That is the only way
//! to shed a client whose socket is full, because the server then never gets to poll
//! its stream and so never sees it lag.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::viewer::Viewer;

/// Detects peers that disappeared without a FIN or RST (power loss, NAT timeout).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Written data unacknowledged for this long drops the connection (Linux).
const USER_TIMEOUT: Duration = Duration::from_secs(60);

pub struct StreamListener {
    inner: TcpListener,
    stall_limit: Duration,
    /// Counts viewers dropped for not reading.
    stalled: Counter,
    /// Counts failed accepts.
    errors: Counter,
    /// One descriptor held back: when the process runs out, it is given up to accept
    /// and close a waiting connection, so clients are told at once instead of waiting
    /// in the backlog, and the accept loop does not spin.
    reserve: std::sync::Mutex<Option<std::fs::File>>,
    last_warning: std::sync::Mutex<Option<Instant>>,
}

/// Accept failures are logged at most this often (they come in floods).
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl StreamListener {
    pub fn new(
        inner: TcpListener,
        stall_limit: Duration,
        stalled: Counter,
        errors: Counter,
    ) -> Self {
        Self {
            inner,
            stall_limit,
            stalled,
            errors,
            reserve: std::sync::Mutex::new(std::fs::File::open("/dev/null").ok()),
            last_warning: std::sync::Mutex::new(None),
        }
    }

    /// After a failed accept: logs (rate-limited) and, when out of descriptors, uses
    /// the reserve to turn one waiting connection away.
    async fn accept_failed(&self, error: io::Error) {
        self.errors.inc();
        {
            let mut last = self.last_warning.lock().unwrap();
            if last.is_none_or(|at| at.elapsed() >= ACCEPT_WARNING_INTERVAL) {
                *last = Some(Instant::now());
                tracing::warn!(%error, failed = self.errors.get(), "accept failed");
            }
        }
        // EMFILE (the process's limit) or ENFILE (the system's), as Linux numbers them.
        let out_of_descriptors = matches!(error.raw_os_error(), Some(24 | 23));
        if out_of_descriptors && self.reserve.lock().unwrap().take().is_some() {
            if let Some(Ok((tcp, _))) = futures::FutureExt::now_or_never(self.inner.accept()) {
                drop(tcp);
            }
            *self.reserve.lock().unwrap() = std::fs::File::open("/dev/null").ok();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    /// The next connection; accept errors (out of file descriptors...) are counted,
    /// logged now and then, and retried after a short pause instead of spinning.
    pub async fn accept(&self) -> (GuardedStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    configure(&tcp);
                    let io = GuardedStream {
                        io: Viewer::new(tcp),
                        stall_limit: self.stall_limit,
                        stall: None,
                        stalled: self.stalled.clone(),
                    };
                    return (io, addr);
                }
                Err(e) => self.accept_failed(e).await,
            }
        }
    }
}

fn configure(tcp: &TcpStream) {
    // SSE frames are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let socket = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(3);
    let _ = socket.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = socket.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// The peer's address, for handlers (`ConnectInfo<PeerAddr>`).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// A TCP stream whose writes fail once they have been blocked for `stall_limit`.
///
/// The socket is shared (`socket`) so that the fan-out can write a frame to an in-step
/// viewer itself, without waking the viewer's task; the two never write at once (see
/// `viewer`). Reads and writes here therefore go through the socket's readiness and
/// its `&self` methods.
pub struct GuardedStream {
    io: Arc<Viewer>,
    stall_limit: Duration,
    /// Armed only while a write is blocked, so idle connections carry no timer.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: Counter,
}

impl GuardedStream {
    /// Peeks at the first bytes once more than `seen` of them have arrived (to route
    /// the first request without consuming it); 0 once the peer has closed without
    /// sending more. Waits on readiness, never polls: bytes that are there but not
    /// enough clear the readiness, so the next wait is for new bytes or the close.
    pub async fn peek_more(&self, buf: &mut [u8], seen: usize) -> io::Result<usize> {
        loop {
            let ready = self.tcp().ready(Interest::READABLE).await?;
            let peeked = self.tcp().try_io(Interest::READABLE, || {
                // SAFETY: viewing initialized bytes as possibly uninitialized is sound,
                // and the kernel writes only initialized bytes into them.
                let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
                match SockRef::from(self.tcp()).peek(uninit)? {
                    n if n > seen || n == 0 => Ok(n),
                    _ => Err(io::ErrorKind::WouldBlock.into()),
                }
            });
            match peeked {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if ready.is_read_closed() {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The socket, for the fan-out to write to while this viewer keeps up.
    pub fn viewer(&self) -> &Arc<Viewer> {
        &self.io
    }

    fn tcp(&self) -> &TcpStream {
        self.io.socket()
    }

    /// Resolves when the peer has closed its side or the connection failed; data it
    /// sends meanwhile (a stream's client sends none) is discarded. Waits through the
    /// socket's own reader slot (`poll_read_ready`) rather than a waiter of its own,
    /// and reads into a buffer on the stack of each poll: this is part of every idle
    /// viewer's task, so it holds next to nothing, and a client that sends anyway costs
    /// one read per 4 KiB.
    pub async fn peer_closed(&self) {
        std::future::poll_fn(|cx| {
            let mut sink = [0u8; 4096];
            loop {
                if ready!(self.tcp().poll_read_ready(cx)).is_err() {
                    return Poll::Ready(());
                }
                match self.tcp().try_read(&mut sink) {
                    Ok(0) => return Poll::Ready(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Poll::Ready(()),
                }
            }
        })
        .await
    }

    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stall = None;
            return poll;
        }
        let limit = self.stall_limit;
        let timer = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stall = None;
            self.stalled.inc();
            tracing::debug!("disconnecting a viewer that stopped reading");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp().poll_read_ready(cx))?;
            // SAFETY: `try_read` writes only initialized bytes and reports how many.
            let unfilled =
                unsafe { &mut *(buf.unfilled_mut() as *mut [MaybeUninit<u8>] as *mut [u8]) };
            match self.tcp().try_read(unfilled) {
                Ok(n) => {
                    // SAFETY: the kernel initialized the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = poll_io(cx, self.tcp(), |io| io.try_write(buf));
        self.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = poll_io(cx, self.tcp(), |io| io.try_write_vectored(bufs));
        self.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TCP socket has nothing of its own to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write))
    }
}

/// Writes once the socket is writable, waiting (with `cx`) while it is not.
fn poll_io(
    cx: &mut Context<'_>,
    io: &TcpStream,
    mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(io.poll_write_ready(cx))?;
        match write(io) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return Poll::Ready(other),
        }
    }
}
