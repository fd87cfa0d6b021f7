//! The viewers' streams, served without hyper.
//!
//! A viewer spends hours on one response. hyper keeps an 8 KiB read buffer and an
//! 8 KiB header buffer for the whole life of a connection, which at tens of thousands
//! of idle viewers is most of the server's memory. So a request for a stream is read
//! here (one small parse, then the buffer is freed), handed to the same axum router as
//! every other request (routing, CORS, errors, headers are not duplicated), and the
//! response is written straight to the socket: head, then each shared frame as it
//! comes, delimited by closing the connection (`Connection: close`), which is how
//! EventSource expects a stream to end anyway.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, header};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{FirstRequest, Shared};
use crate::net::{GuardedStream, PeerAddr};
use crate::sse::Stream;
use crate::subscription::{StreamOver, Subscription};

/// Requests for a stream start with this; everything else goes to hyper.
pub const PREFIX: &[u8] = b"GET /api/v1/chats/sse-connect/";
/// Largest request head accepted for a stream.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// Where a connection goes, by its first bytes.
pub enum Route {
    /// A stream request: served here.
    Stream,
    /// Anything else: served by hyper.
    Other,
    /// The client closed, or failed, before saying enough.
    Closed,
}

/// Routes the connection by its first request, without consuming it. Waits for bytes
/// to arrive (never polls), so a client that sends a prefix of the stream path and
/// stalls costs nothing while it waits, and one that closes is let go at once.
pub async fn route(io: &GuardedStream) -> Route {
    let mut peeked = [0u8; PREFIX.len()];
    let mut seen = 0;
    loop {
        match io.peek_more(&mut peeked, seen).await {
            Ok(0) | Err(_) => return Route::Closed,
            Ok(n) if !PREFIX.starts_with(&peeked[..n]) => return Route::Other,
            Ok(n) if n == PREFIX.len() => return Route::Stream,
            Ok(n) => seen = n,
        }
    }
}

/// Reads and answers one stream request. Returns the subscription for the task to
/// stream ([`stream`]), or `None` once the connection is done: an error was answered,
/// the client left, or the stream was served through its body (rare: see
/// `sse::Stream`). The request head must be complete by the connection's deadline (its
/// header timeout, counted from accept); the connection leaves the pending table once
/// it is.
pub(super) async fn open(
    mut io: GuardedStream,
    peer: PeerAddr,
    shared: &Shared,
    first: FirstRequest,
) -> Option<(GuardedStream, Subscription)> {
    let FirstRequest { deadline, guard } = first;
    let parsed = tokio::select! {
        parsed = tokio::time::timeout_at(deadline, read_request(&mut io)) => parsed,
        () = guard.evicted() => return None,
    };
    let Ok(Some(mut request)) = parsed else {
        let _ = io
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            )
            .await;
        return None;
    };
    drop(guard);
    request.extensions_mut().insert(ConnectInfo(peer));
    request.extensions_mut().insert(crate::sse::Direct);
    let Ok(response) = shared.router.clone().oneshot(request).await;
    let (parts, body) = response.into_parts();
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        // An error (400, 204, 503...): small, sent whole with its length.
        let body = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let head = head(&Response::from_parts(parts, ()), Some(body.len()));
        let _ = io.write_all(&[head.as_slice(), &body].concat()).await;
        return None;
    }
    let subscription = parts.extensions.get::<Stream>().and_then(Stream::take);
    io.write_all(&head(&Response::from_parts(parts, ()), None))
        .await
        .ok()?;
    match subscription {
        // The body only wraps the subscription taken here; it is not kept.
        Some(subscription) => Some((io, subscription)),
        None => {
            stream_body(io, body, &shared.abort).await;
            None
        }
    }
}

/// Writes the viewer's frames while it is behind, and lets the fan-out write them
/// while it keeps up (see `viewer`); this task then only waits for the peer to close.
/// This is what an idle viewer's task holds for hours, so it is kept small: a plain fn
/// returning `async move` (an `async fn` would hold its arguments twice).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub(super) fn stream(
    mut io: GuardedStream,
    mut subscription: Subscription,
    abort: &CancellationToken,
) -> impl Future<Output = ()> + '_ {
    async move {
        loop {
            match subscription.try_next_frame() {
                Ok(Some(bytes)) => {
                    if io.write_all(&bytes).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(StreamOver) => break,
            }
            if !subscription.go_direct(io.viewer()) {
                // A frame came meanwhile.
                continue;
            }
            let rest = tokio::select! {
                handoff = io.viewer().handed_off() => subscription.resume(*handoff),
                () = io.peer_closed() => return,
                () = abort.cancelled() => return,
            };
            if io.write_all(&rest).await.is_err() {
                return;
            }
        }
        let _ = io.shutdown().await;
    }
}

/// A stream whose subscription is only reachable through its body.
async fn stream_body(mut io: GuardedStream, body: Body, abort: &CancellationToken) {
    let mut frames = body.into_data_stream();
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(bytes)) => {
                    if io.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                _ => break,
            },
            () = io.peer_closed() => return,
            () = abort.cancelled() => return,
        }
    }
    let _ = io.shutdown().await;
}

/// Reads and parses one request head; `None` if it is malformed or too large.
async fn read_request(io: &mut GuardedStream) -> Option<Request<Body>> {
    // On the heap and freed once parsed: nothing of the request stays with the stream.
    let mut buf = Vec::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        match parse_head(&buf) {
            Head::Partial => continue,
            Head::Invalid => return None,
            Head::Complete(request) => return Some(*request),
        }
    }
}

/// What the bytes received so far hold.
enum Head {
    /// Not a whole head yet, and not too long to become one.
    Partial,
    /// Malformed, or longer than `MAX_HEAD`.
    Invalid,
    Complete(Box<Request<Body>>),
}

fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Head::Partial,
        Ok(httparse::Status::Complete(_)) if buf.len() <= MAX_HEAD => {
            let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
                return Head::Invalid;
            };
            let mut request = Request::builder().method(method).uri(path);
            for h in parsed.headers.iter() {
                request = request.header(h.name, h.value);
            }
            request
                .body(Body::empty())
                .map_or(Head::Invalid, |r| Head::Complete(Box::new(r)))
        }
        _ => Head::Invalid,
    }
}

/// The response head in HTTP/1.1 form; without a length the body ends at close.
fn head(response: &Response<()>, length: Option<usize>) -> Vec<u8> {
    let status = response.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in response.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(length) = length.filter(|_| status.as_u16() != 204 && status.as_u16() != 304) {
        out.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &[u8] =
        b"GET /api/v1/chats/sse-connect/3f1c2a9e-1111-4222-8333-444455556666 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 00ab-7\r\n\r\n";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        /// Whatever a client sends, parsing ends in one of three answers, never a panic,
        /// and never accepts more than the bound.
        #[test]
        fn any_bytes_are_partial_invalid_or_a_bounded_request(bytes in prop::collection::vec(any::<u8>(), 0..17_000)) {
            match parse_head(&bytes) {
                Head::Partial => prop_assert!(bytes.len() < MAX_HEAD),
                Head::Invalid => {}
                Head::Complete(_) => prop_assert!(bytes.len() <= MAX_HEAD),
            }
        }

        /// A valid head cut anywhere is partial (or already invalid), never misread.
        #[test]
        fn a_valid_head_cut_short_is_partial(cut in 0..VALID.len()) {
            prop_assert!(matches!(parse_head(&VALID[..cut]), Head::Partial));
        }

        /// Valid heads with hostile header values become requests or are refused whole.
        #[test]
        fn hostile_header_values_never_panic(
            name in "[A-Za-z-]{1,40}",
            value in prop::collection::vec(any::<u8>(), 0..200),
            path in "/[ -~]{0,200}",
        ) {
            let mut head = format!("GET {path} HTTP/1.1\r\n{name}: ").into_bytes();
            head.extend_from_slice(&value);
            head.extend_from_slice(b"\r\n\r\n");
            let _ = parse_head(&head);
        }
    }

    #[test]
    fn the_valid_head_parses_with_its_headers() {
        let Head::Complete(request) = parse_head(VALID) else {
            panic!("a valid head");
        };
        assert!(
            request
                .uri()
                .path()
                .starts_with("/api/v1/chats/sse-connect/")
        );
        assert_eq!(request.headers()["last-event-id"], "00ab-7");
    }
}
