//! `GET /api/v1/chats/sse-connect/{sessionId}`: the viewers' stream.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;

use super::{AppState, session_id};
use crate::error::AppError;
use crate::sse;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/chats/sse-connect/{session_id}", get(connect))
}

async fn connect(
    State(state): State<AppState>,
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
    let subscription = state.registry.attach(id, last_event_id).await?;
    Ok(sse::response(subscription))
}
