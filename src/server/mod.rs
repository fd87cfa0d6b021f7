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

use crate::net::{PeerAddr, StreamListener};

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
    loop {
        let (io, peer) = tokio::select! {
            _ = drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let guard = pending.enter();
        let deadline = Instant::now() + header_timeout;
        let router = router.clone();
        let (drain, abort) = (drain.clone(), abort.clone());
        let http = http.clone();
        connections.spawn(async move {
            let route = tokio::select! {
                route = streams::route(&io) => route,
                () = tokio::time::sleep_until(deadline) => Route::Closed,
                () = guard.evicted() => Route::Closed,
            };
            match route {
                Route::Stream => {
                    streams::serve(io, PeerAddr(peer), router, abort, deadline, guard).await;
                }
                // Boxed: hyper's connection state is large, and each task is sized for
                // its largest branch; the stream branch stays small.
                Route::Other => {
                    let first = FirstRequest { deadline, guard };
                    Box::pin(serve_http(http, io, peer, router, drain, abort, first)).await;
                }
                Route::Closed => {}
            }
        });
    }
    tracing::debug!("stopped accepting connections");
}

/// A hyper connection until its first request head is complete: still pending, and
/// bound by the connection's deadline (hyper's own header timeout covers the later
/// requests of a keep-alive connection).
struct FirstRequest {
    deadline: Instant,
    guard: PendingGuard,
}

/// Any other request: hyper, with keep-alive, draining gracefully on shutdown.
async fn serve_http(
    http: http1::Builder,
    io: crate::net::GuardedStream,
    peer: std::net::SocketAddr,
    router: Router,
    drain: CancellationToken,
    abort: CancellationToken,
    first: FirstRequest,
) {
    let FirstRequest { deadline, guard } = first;
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
