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

/// Marks a stream request the server reads and writes itself (`server::streams`), so
/// that the fan-out can write to its socket: only such a stream is compressed, since
/// its compressed bytes are shared; one served through hyper (a request on a reused
/// connection) would need a compressor of its own, and is sent plain.
#[derive(Clone, Copy, Debug)]
pub struct Direct;

/// The subscription behind an SSE response, in its extensions.
#[derive(Clone)]
pub struct Stream(Arc<Mutex<Option<Subscription>>>);

impl Stream {
    /// The subscription, unless the body or someone else already took it.
    pub fn take(&self) -> Option<Subscription> {
        self.0.lock().unwrap().take()
    }
}

/// The SSE response for an admitted subscriber; `vary`: whether the encoding
/// depended on the request's `Accept-Encoding` (compression is on).
pub fn response(subscription: Subscription, vary: bool) -> Response {
    let gzip = subscription.is_compressed();
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
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if vary {
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
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

/// Whether a request's `Accept-Encoding` takes gzip (RFC 9110 §12.5.3: listed, or
/// `*`, with a weight above zero; an explicit `gzip;q=0` refuses it).
pub fn accepts_gzip(accept_encoding: Option<&[u8]>) -> bool {
    let Some(value) = accept_encoding.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let mut any = false;
    for item in value.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let weight = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            return weight > 0.0;
        }
        any |= coding == "*" && weight > 0.0;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::accepts_gzip;

    #[test]
    fn accept_encoding_is_read_as_browsers_and_curl_send_it() {
        for (value, gzip) in [
            ("gzip, deflate, br, zstd", true),
            ("deflate, gzip;q=1.0, *;q=0.5", true),
            ("br;q=1.0, gzip;q=0", false),
            ("identity", false),
            ("*", true),
            ("*;q=0", false),
            ("GZIP", true),
            ("gzip;q=0, *", false),
            ("", false),
        ] {
            assert_eq!(accepts_gzip(Some(value.as_bytes())), gzip, "{value:?}");
        }
        assert!(!accepts_gzip(None));
    }
}
