//! The listener: accepts TCP connections and prepares them for streams that
//! stay open for hours. Each connection gets TCP keepalive and a user timeout (so a
//! viewer that vanished without closing is found), and a write-stall guard: a viewer
//! that accepts no bytes at all for `stall_limit` is disconnected. That is the only way
//! to shed a client whose socket is full, because the server then never gets to poll
//! its stream and so never sees it lag.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

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
}

impl StreamListener {
    pub fn new(inner: TcpListener, stall_limit: Duration, stalled: Counter) -> Self {
        Self {
            inner,
            stall_limit,
            stalled,
        }
    }
}

impl StreamListener {
    /// The next connection; accept errors (out of file descriptors...) are logged and
    /// retried after a pause instead of spinning.
    pub async fn accept(&self) -> (GuardedStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    configure(&tcp);
                    let io = GuardedStream {
                        io: tcp,
                        stall_limit: self.stall_limit,
                        stall: None,
                        stalled: self.stalled.clone(),
                    };
                    return (io, addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
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
pub struct GuardedStream {
    io: TcpStream,
    stall_limit: Duration,
    /// Armed only while a write is blocked, so idle connections carry no timer.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: Counter,
}

impl GuardedStream {
    /// Reads without consuming (to route the first request).
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.io.peek(buf).await
    }

    /// Resolves when the peer has closed its side or the connection failed; data it
    /// sends meanwhile (a stream's client sends none) is discarded.
    pub async fn peer_closed(&self) {
        let mut sink = [0u8; 64];
        loop {
            if self.io.readable().await.is_err() {
                return;
            }
            match self.io.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.guard(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
