//! One subscriber's SSE response: the prelude (retry advice, replayed batches or a
//! `reset`), then the session's shared frames as they are broadcast. The stream ends
//! after an `end` or `shutdown` frame, or when the subscriber has fallen so far behind
//! that frames it has not read were overwritten: it is then disconnected and resumes
//! from its `Last-Event-ID`, instead of the server buffering for it without bound.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use tokio::sync::broadcast::error::RecvError;

use crate::registry::Subscription;

/// The SSE response for an admitted subscriber.
pub fn response(subscription: Subscription) -> Response {
    let mut response = Body::from_stream(frames(subscription)).into_response();
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn frames(subscription: Subscription) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let Subscription {
        prelude,
        frames,
        guard,
    } = subscription;
    let live = stream::unfold(Some((frames, guard)), |state| async move {
        let (mut frames, guard) = state?;
        match frames.recv().await {
            Ok(frame) if frame.last => Some((frame.bytes, None)),
            Ok(frame) => Some((frame.bytes, Some((frames, guard)))),
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "disconnecting a slow subscriber");
                guard.metrics().slow_subscribers.inc();
                None
            }
            Err(RecvError::Closed) => None,
        }
    });
    stream::once(async move { prelude }).chain(live).map(Ok)
}
