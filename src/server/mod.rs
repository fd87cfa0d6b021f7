//! The HTTP/1.1 server loop: accepts from the [`StreamListener`], serves each
//! connection with hyper, and drains them on shutdown.
//!
//! Our own loop rather than `axum::serve` for two reasons: per-connection state is
//! the dominant cost at tens of thousands of idle viewers, and HTTP/1.1 alone (SSE
//! needs nothing else; a proxy terminates HTTP/2) keeps it small; and shutdown can both
//! drain gracefully and, past the deadline, close what is still open.

use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::net::{PeerAddr, StreamListener};

mod streams;

/// A client must send its request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until `drain` is cancelled; every connection task is tracked in `connections`
/// and stops at once when `abort` is cancelled.
pub async fn serve(
    listener: StreamListener,
    router: Router,
    drain: CancellationToken,
    abort: CancellationToken,
    connections: TaskTracker,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    loop {
        let (io, peer) = tokio::select! {
            _ = drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let router = router.clone();
        let (drain, abort) = (drain.clone(), abort.clone());
        let http = http.clone();
        connections.spawn(async move {
            if streams::is_stream_request(&io, HEADER_READ_TIMEOUT).await {
                streams::serve(io, PeerAddr(peer), router, abort, HEADER_READ_TIMEOUT).await;
            } else {
                // Boxed: hyper's connection state is large, and each task is sized for
                // its largest branch; the stream branch stays small.
                Box::pin(serve_http(http, io, peer, router, drain, abort)).await;
            }
        });
    }
    tracing::debug!("stopped accepting connections");
}

/// Any other request: hyper, with keep-alive, draining gracefully on shutdown.
async fn serve_http(
    http: http1::Builder,
    io: crate::net::GuardedStream,
    peer: std::net::SocketAddr,
    router: Router,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        router.clone().oneshot(request)
    });
    let connection = http.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = drain.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = connection => {}
        _ = abort.cancelled() => {}
    }
}
