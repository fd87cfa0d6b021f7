//! Liveness, readiness and metrics for operators.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The process is up and serving HTTP.
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready while this instance can take a new viewer: the broker is connected, the
/// server is not shutting down, and it has a connection slot left. Each reason it is
/// not is named in `unavailable`, so an operator sees why a load balancer skips it.
/// How busy it is (`runtimeLagMs`) is reported, but does not make it unready: a busy
/// instance still serves its viewers, and pulling it out of rotation for being busy
/// would move its load, not remove it.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let connected = state.broker.is_connected();
    let closing = state.registry.is_closing();
    let connections = state.registry.connection_count();
    let max_connections = state.config.max_connections;
    let full = connections >= max_connections;
    let unavailable: Vec<&str> = [
        (!connected, "broker disconnected"),
        (closing, "shutting down"),
        (full, "connection limit reached"),
    ]
    .into_iter()
    .filter_map(|(yes, why)| yes.then_some(why))
    .collect();
    let ready = unavailable.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "unavailable": unavailable,
        "broker": state.broker.kind(),
        "brokerConnected": connected,
        "shuttingDown": closing,
        "sessions": state.registry.session_count(),
        "connections": connections,
        "maxConnections": max_connections,
        "pendingConnections": state.pending.count(),
        "runtimeLagMs": state.metrics.runtime_lag_ms.get(),
    });
    (status, Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
