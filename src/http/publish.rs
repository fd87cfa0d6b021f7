//! The publish API: lets a deployment run without a tenant writing to Redis directly.
//! It goes through the same broker as everything else, so a message published here is
//! delivered, batched and billed exactly like one published with `redis-cli`.
//!
//! Guarded by `Authorization: Bearer $PUBLISH_TOKEN`. Without a token configured it is
//! for processes on this host only, so a fresh install is never an open relay: the peer
//! must be loopback, the request must not have come through a proxy (a proxy on the same
//! host makes every client look local) and must not come from a web page (a browser on
//! the host is local too). Bodies must be `application/json` (which a browser cannot
//! send cross-origin without a CORS preflight, and CORS is not offered here).

use std::net::SocketAddr;

use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;

use super::{AppState, session_id};
use crate::broker::{chat_channel, end_channel};
use crate::error::AppError;
use crate::net::PeerAddr;

/// Headers a proxy adds; their presence means the loopback peer is not the client.
const FORWARDING: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
];

pub fn router(max_body: usize) -> Router<AppState> {
    Router::new()
        .route("/api/v1/chats/{session_id}/messages", post(publish_message))
        .route("/api/v1/chats/{session_id}/end", post(end_session))
        .layer(DefaultBodyLimit::max(max_body))
}

/// Publishes one chat message, forwarded byte for byte as the payload.
async fn publish_message(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, AppError> {
    authorize(state.config.publish_token.as_deref(), &headers, peer)?;
    let id = session_id(&raw)?;
    let body = json_object(&headers, body, state.config.max_message_bytes)?
        .ok_or_else(|| AppError::BadRequest("the body must be a JSON object".into()))?;
    let receivers = state.broker.publish(chat_channel(id), body).await?;
    Ok(accepted(id, receivers))
}

/// Ends a session: every viewer gets `event: end` and the streams close. The body, a
/// JSON object describing the session, is optional; `{"id": "<sessionId>"}` otherwise.
async fn end_session(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, AppError> {
    authorize(state.config.publish_token.as_deref(), &headers, peer)?;
    let id = session_id(&raw)?;
    let body = match json_object(&headers, body, state.config.max_message_bytes)? {
        Some(body) => body,
        None => Bytes::from(serde_json::json!({ "id": id }).to_string()),
    };
    let receivers = state.broker.publish(end_channel(id), body).await?;
    Ok(accepted(id, receivers))
}

fn accepted(id: uuid::Uuid, receivers: usize) -> impl IntoResponse {
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "sessionId": id, "receivers": receivers })),
    )
}

fn authorize(token: Option<&str>, headers: &HeaderMap, peer: SocketAddr) -> Result<(), AppError> {
    let Some(token) = token else {
        return local_only(headers, peer);
    };
    // RFC 9110: the scheme is case-insensitive.
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim())
        .unwrap_or_default();
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(AppError::Unauthorized)
    }
}

/// Without a token: a process on this host, speaking to us directly.
fn local_only(headers: &HeaderMap, peer: SocketAddr) -> Result<(), AppError> {
    if !peer.ip().is_loopback() {
        return Err(AppError::Forbidden(
            "publishing is only allowed from loopback unless PUBLISH_TOKEN is set",
        ));
    }
    if FORWARDING.iter().any(|h| headers.contains_key(*h)) {
        return Err(AppError::Forbidden(
            "this request came through a proxy; set PUBLISH_TOKEN to publish through one",
        ));
    }
    // Browsers send Origin with every POST; other clients do not. A page of another
    // origin, or one whose name was rebound to this host, is refused.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, o)| o);
        if host.is_none() || same != host || !host.is_some_and(is_loopback_host) {
            return Err(AppError::Forbidden(
                "publishing from another web origin needs PUBLISH_TOKEN",
            ));
        }
    }
    Ok(())
}

/// `localhost`, `127.0.0.1`, `[::1]` and the like, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Compares without returning early, so response timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body if it is one JSON object in UTF-8 (no lone surrogate escapes either: it
/// must be representable as the text it claims to be); `None` if it is empty.
fn json_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Option<Bytes>, AppError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge(limit)
        } else {
            AppError::BadRequest(rejection.body_text())
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(AppError::UnsupportedMediaType);
    }
    let text = std::str::from_utf8(&body)
        .map_err(|e| AppError::BadRequest(format!("the body is not UTF-8: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| AppError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(AppError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AppError;
    use proptest::prelude::*;

    fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Whatever the body, the answer is a clear error or a JSON object in UTF-8,
        /// forwarded byte for byte.
        #[test]
        fn any_body_is_refused_or_a_utf8_json_object(body in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Some(accepted)) = json_object(&json_headers(), Ok(Bytes::from(body.clone())), 1024) {
                prop_assert_eq!(&accepted[..], &body[..]);
                let text = std::str::from_utf8(&accepted).unwrap();
                let value: serde_json::Value = serde_json::from_str(text).unwrap();
                prop_assert!(value.is_object());
            }
        }

        /// Every JSON object of text is accepted, whatever the text holds.
        #[test]
        fn any_json_object_of_text_is_accepted(fields in prop::collection::hash_map(".*", ".*", 0..8)) {
            let body = serde_json::to_vec(&fields).unwrap();
            let accepted = json_object(&json_headers(), Ok(Bytes::from(body.clone())), 1 << 20);
            prop_assert!(matches!(accepted, Ok(Some(b)) if b[..] == body[..]));
        }
    }

    fn auth(token: Option<&str>, peer: &str, header: Option<&str>) -> Result<(), AppError> {
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert(header::AUTHORIZATION, h.parse().unwrap());
        }
        authorize(token, &headers, peer.parse().unwrap())
    }

    #[test]
    fn without_a_token_only_loopback_may_publish() {
        assert!(auth(None, "127.0.0.1:5000", None).is_ok());
        assert!(auth(None, "[::1]:5000", None).is_ok());
        assert!(matches!(
            auth(None, "10.1.2.3:5000", None),
            Err(AppError::Forbidden(_))
        ));
        assert!(matches!(
            auth(None, "10.1.2.3:5000", Some("Bearer anything")),
            Err(AppError::Forbidden(_))
        ));
    }

    #[test]
    fn with_a_token_everyone_needs_it_even_loopback() {
        let t = Some("s3cret");
        assert!(auth(t, "10.1.2.3:5000", Some("Bearer s3cret")).is_ok());
        assert!(matches!(
            auth(t, "127.0.0.1:1", None),
            Err(AppError::Unauthorized)
        ));
        assert!(matches!(
            auth(t, "127.0.0.1:1", Some("Bearer s3cre")),
            Err(AppError::Unauthorized)
        ));
        assert!(auth(t, "10.1.2.3:5000", Some("bearer s3cret")).is_ok());
        assert!(auth(t, "10.1.2.3:5000", Some("BEARER s3cret")).is_ok());
        assert!(auth(t, "10.1.2.3:5000", Some("Basic s3cret")).is_err());
    }

    fn local(pairs: &[(&'static str, &str)]) -> Result<(), AppError> {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.insert(*k, v.parse().unwrap());
        }
        authorize(None, &headers, "127.0.0.1:5000".parse().unwrap())
    }

    #[test]
    fn without_a_token_proxied_and_browser_requests_are_refused() {
        assert!(local(&[("host", "localhost:8080")]).is_ok());
        for h in FORWARDING {
            assert!(local(&[(h, "198.51.100.7")]).is_err(), "{h}");
        }
        assert!(
            local(&[
                ("host", "localhost:8080"),
                ("origin", "http://localhost:8080")
            ])
            .is_ok()
        );
        assert!(local(&[("host", "[::1]:8080"), ("origin", "http://[::1]:8080")]).is_ok());
        assert!(
            local(&[
                ("host", "localhost:8080"),
                ("origin", "https://evil.example")
            ])
            .is_err()
        );
        assert!(
            local(&[
                ("host", "evil.example:8080"),
                ("origin", "http://evil.example:8080")
            ])
            .is_err()
        );
        assert!(local(&[("origin", "null")]).is_err());
    }
}
