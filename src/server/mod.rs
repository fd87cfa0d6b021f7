//! The HTTP/1.1 server loop: accepts from the [`StreamListener`], serves each
//! connection with hyper, and drains them on shutdown.
//!
//! Our own loop rather than `axum::serve` for two reasons: per-connection state is
//! the dominant cost at tens of thousands of idle viewers, and HTTP/1.1 alone (SSE
//! needs nothing else; a proxy terminates HTTP/2) keeps it small; and shutdown can both
//! drain gracefully and, past the deadline, close what is still open.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::net::{GuardedStream, PeerAddr, StreamListener};

mod pending;
mod streams;

pub use pending::Pending;
use pending::PendingGuard;
use streams::Route;

/// Serves until `drain` is cancelled; every connection task is tracked in `connections`
/// and stops at once when `abort` is cancelled. Each connection must complete its
/// first request head within `header_timeout` of its accept, and is counted in
/// `pending` until it has.
pub async fn serve(
    listener: StreamListener,
    router: Router,
    drain: CancellationToken,
    abort: CancellationToken,
    connections: TaskTracker,
    header_timeout: Duration,
    pending: Arc<Pending>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let shared = Arc::new(Shared {
        router,
        http,
        drain: drain.clone(),
        abort,
    });
    loop {
        let (io, peer) = tokio::select! {
            _ = drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let accepted = Box::new(Accepted {
            io,
            peer: PeerAddr(peer),
            first: FirstRequest {
                deadline: Instant::now() + header_timeout,
                guard: pending.enter(),
            },
        });
        connections.spawn(connection(accepted, shared.clone()));
    }
    tracing::debug!("stopped accepting connections");
}

/// What every connection's task needs, shared: an idle viewer's task holds one
/// pointer to it rather than copies.
struct Shared {
    router: Router,
    http: http1::Builder,
    drain: CancellationToken,
    abort: CancellationToken,
}

/// A connection as accepted. Boxed until it is routed: the task keeps only a pointer
/// to it for its whole life.
struct Accepted {
    io: GuardedStream,
    peer: PeerAddr,
    first: FirstRequest,
}

/// One connection, from accept to close. A task is sized for its largest state, and an
/// idle viewer's stream is the state that lasts (hours, for tens of thousands of
/// viewers); so the brief, large ones (reading and answering the request, hyper's
/// connection) are boxed, and only the stream's own state stays with the task.
/// (A plain fn returning `async move`: an `async fn` would keep its arguments twice.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn connection(accepted: Box<Accepted>, shared: Arc<Shared>) -> impl Future<Output = ()> {
    async move {
        let route = Box::pin(async {
            tokio::select! {
                route = streams::route(&accepted.io) => route,
                () = tokio::time::sleep_until(accepted.first.deadline) => Route::Closed,
                () = accepted.first.guard.evicted() => Route::Closed,
            }
        })
        .await;
        let Accepted { io, peer, first } = *accepted;
        match route {
            Route::Stream => {
                let Some((io, subscription)) =
                    Box::pin(streams::open(io, peer, &shared, first)).await
                else {
                    return;
                };
                streams::stream(io, subscription, &shared.abort).await;
            }
            Route::Other => Box::pin(serve_http(io, peer.0, &shared, first)).await,
            Route::Closed => {}
        }
    }
}

/// A connection until its first request head is complete: still pending, and bound by
/// the connection's deadline (hyper's own header timeout covers the later requests of
/// a keep-alive connection).
struct FirstRequest {
    deadline: Instant,
    guard: PendingGuard,
}

/// Any other request: hyper, with keep-alive, draining gracefully on shutdown.
async fn serve_http(
    io: GuardedStream,
    peer: std::net::SocketAddr,
    shared: &Shared,
    first: FirstRequest,
) {
    let FirstRequest { deadline, guard } = first;
    let Shared {
        router,
        http,
        drain,
        abort,
    } = shared;
    let router = router.clone();
    let evicted = guard.evicted.clone();
    let arrived = Arc::new(Notify::new());
    let waiting = Arc::new(std::sync::Mutex::new(Some(guard)));
    let service = {
        let (arrived, waiting) = (arrived.clone(), waiting.clone());
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            if waiting.lock().unwrap().take().is_some() {
                arrived.notify_one();
            }
            request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
            router.clone().oneshot(request)
        })
    };
    let connection = http.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = arrived.notified() => {}
        () = tokio::time::sleep_until(deadline) => return,
        () = evicted.cancelled() => return,
    }
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = drain.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = connection => {}
        _ = abort.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
    use tokio::net::{TcpListener, TcpStream};

    /// What an idle viewer costs is mostly its task, and a task is sized for the
    /// largest state of its future. The stream's state is under 400 bytes; reading and
    /// answering the request take about 1 KiB more, hyper's connection more still. So
    /// those are boxed, and the task must stay at the stream's size. 400 bytes is also
    /// what fits tokio's task cell (1.54: 128-byte aligned, 112 bytes of its own) in
    /// 512 bytes: one byte more costs 128 more per connection. Unboxing a state fails
    /// this, as does a stream state grown past the cell.
    #[tokio::test]
    async fn a_connections_task_is_sized_for_its_stream_not_its_request() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(tcp.local_addr().unwrap());
        let listener = StreamListener::new(
            tcp,
            Duration::from_secs(1),
            Counter::default(),
            Counter::default(),
        );
        let ((io, peer), _client) = tokio::join!(listener.accept(), client);
        let pending = Pending::new(4, Gauge::default(), Counter::default());
        let accepted = Box::new(Accepted {
            io,
            peer: PeerAddr(peer),
            first: FirstRequest {
                deadline: Instant::now(),
                guard: pending.enter(),
            },
        });
        let shared = Arc::new(Shared {
            router: Router::new(),
            http: http1::Builder::new(),
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
        });
        let task = connection(accepted, shared);
        let size = std::mem::size_of_val(&task);
        eprintln!("connection task: {size} bytes");
        assert!(size <= 400, "a connection's task holds {size} bytes");
    }
}
