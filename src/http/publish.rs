//! The publish API: lets a deployment run without a tenant writing to Redis directly.
//! It goes through the same broker as everything else, so a message published here is
//! delivered, batched and billed exactly like one published with `redis-cli`.
//!
//! Guarded by `Authorization: Bearer $PUBLISH_TOKEN`; without a token configured only
//! loopback clients may publish, so a fresh install is never an open relay.

use std::net::SocketAddr;

use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::IgnoredAny;

use super::{AppState, session_id};
use crate::broker::{chat_channel, end_channel};
use crate::error::AppError;
use crate::net::PeerAddr;

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
    let body = json_object(body, state.config.max_message_bytes)?
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
    let body = match json_object(body, state.config.max_message_bytes)? {
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
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(AppError::Forbidden)
        };
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(AppError::Unauthorized)
    }
}

/// Compares without returning early, so response timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body if it is one JSON object; `None` if it is empty.
fn json_object(
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
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(AppError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice::<IgnoredAny>(&body)
        .map_err(|e| AppError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AppError;

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
            Err(AppError::Forbidden)
        ));
        assert!(matches!(
            auth(None, "10.1.2.3:5000", Some("Bearer anything")),
            Err(AppError::Forbidden)
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
    }
}
