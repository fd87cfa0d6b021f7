//! `GET /api/v1/chats/sse-connect/{sessionId}`: the viewers' stream.

use axum::Extension;
use axum::Router;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;

use super::{AppState, session_id};
use crate::class;
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
    RawQuery(query): RawQuery,
    direct: Option<Extension<sse::Direct>>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let id = session_id(&raw)?;
    let asked = class::parse(query.as_deref(), state.config.tick)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| AppError::BadRequest("Last-Event-ID is not text".into()))?,
        ),
    };
    let client = client::address(peer.ip(), &headers, &state.config.trusted_proxies);
    let mut subscription = state
        .registry
        .attach(id, last_event_id, client, asked)
        .await?;
    let compression = state.config.compression;
    let accepts = sse::accepts_gzip(headers.get("accept-encoding").map(|v| v.as_bytes()));
    if compression && accepts && direct.is_some() {
        subscription = subscription.compressed();
    }
    Ok(sse::response(subscription, compression))
}
