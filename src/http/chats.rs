//! `GET /api/v1/chats/sse-connect/{sessionId}`: the viewers' stream.

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;

use super::{AppState, session_id};
use crate::client;
use crate::error::AppError;
use crate::net::PeerAddr;
use crate::sse;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/chats/sse-connect/{session_id}", get(connect))
}

async fn connect(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let id = session_id(&raw)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| AppError::BadRequest("Last-Event-ID is not text".into()))?,
        ),
    };
    let client = client::address(peer.ip(), &headers, &state.config.trusted_proxies);
    let subscription = state.registry.attach(id, last_event_id, client).await?;
    Ok(sse::response(subscription))
}
