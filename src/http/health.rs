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

/// Ready while the broker is connected and the server is not shutting down: a load
/// balancer should not send viewers to an instance that cannot feed them.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let connected = state.broker.is_connected();
    let closing = state.registry.is_closing();
    let ready = connected && !closing;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "broker": state.broker.kind(),
        "brokerConnected": connected,
        "shuttingDown": closing,
        "sessions": state.registry.session_count(),
        "connections": state.registry.connection_count(),
        "pendingConnections": state.pending.count(),
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
