//! One subscriber's SSE response: the prelude (retry advice, replayed batches or a
//! `reset`), then the session's shared frames as they come. The stream ends after an
//! `end` or `shutdown` frame, or when the subscriber has fallen too far behind (see
//! `subscription`): it is then disconnected and resumes from its `Last-Event-ID`,
//! instead of the server buffering for it without bound.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, stream};

use crate::subscription::Subscription;

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
    stream::unfold(subscription, |mut subscription| async move {
        let bytes = subscription.next_frame().await?;
        Some((Ok(bytes), subscription))
    })
}
