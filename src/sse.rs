//! One subscriber's SSE response: the prelude (retry advice, replayed batches or a
//! `reset`), then the session's shared frames as they come. The stream ends after an
//! `end` or `shutdown` frame, or when the subscriber has fallen too far behind (see
//! `subscription`): it is then disconnected and resumes from its `Last-Event-ID`,
//! instead of the server buffering for it without bound.
//!
//! The response carries its subscription ([`Stream`]) so that the server, which owns
//! the socket, can write the stream itself and let the fan-out write to it while the
//! viewer keeps up (`server::streams`, `viewer`). The body reads the subscription
//! only when nobody took it (a stream served through hyper).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream;

use crate::subscription::Subscription;

/// The subscription behind an SSE response, in its extensions.
#[derive(Clone)]
pub struct Stream(Arc<Mutex<Option<Subscription>>>);

impl Stream {
    /// The subscription, unless the body or someone else already took it.
    pub fn take(&self) -> Option<Subscription> {
        self.0.lock().unwrap().take()
    }
}

/// The SSE response for an admitted subscriber.
pub fn response(subscription: Subscription) -> Response {
    let stream = Stream(Arc::new(Mutex::new(Some(subscription))));
    let mut response = Body::from_stream(frames(stream.clone())).into_response();
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.extensions_mut().insert(stream);
    response
}

fn frames(stream: Stream) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    stream::unfold(Err(stream), |state| async move {
        let mut subscription = match state {
            Ok(subscription) => subscription,
            Err(stream) => stream.take()?,
        };
        let bytes = subscription.next_frame().await?;
        Some((Ok(bytes), Ok(subscription)))
    })
}
