//! The HTTP surface: each module exposes its `router()`, merged here with the layers
//! every response shares (CORS, the instance header).

mod chats;
mod demo;
mod health;
mod publish;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use uuid::Uuid;

use crate::broker::Broker;
use crate::config::{Config, CorsOrigins};
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::server::Pending;

/// Handles shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub broker: Broker,
    /// Connections without a complete request head yet (for `/readyz`).
    pub pending: Arc<Pending>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
}

pub fn router(state: AppState) -> Router {
    let instance = HeaderValue::from_str(&state.config.instance_id)
        .unwrap_or_else(|_| HeaderValue::from_static("chat-sync"));
    // CORS on the viewers' streams only: the publish API is for servers, and offering
    // it to other origins would let any page a browser opens try it.
    let cors = cors(&state.config.cors_origins);
    Router::new()
        .merge(chats::router().layer(cors))
        .merge(publish::router(state.config.max_message_bytes))
        .merge(health::router())
        .merge(demo::router())
        .with_state(state)
        .layer(middleware::from_fn(close_after_get))
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("x-instance-id"),
            instance,
        ))
}

/// Every GET answered by hyper (the demo page, health, metrics, the API description)
/// closes its connection. A browser would otherwise send its next stream on that
/// connection, which hyper serves, plain: only a stream on a connection of its own is
/// served on the stream path, where its session's compressed bytes are shared (see
/// `sse::Direct`). The publish API (POST) keeps its connections.
async fn close_after_get(request: Request, next: Next) -> Response {
    let close = request.method() == Method::GET
        && request.extensions().get::<crate::sse::Direct>().is_none();
    let mut response = next.run(request).await;
    if close {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn cors(origins: &CorsOrigins) -> CorsLayer {
    let allow = match origins {
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => {
            AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        }
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::OPTIONS])
        .allow_headers([HeaderName::from_static("last-event-id")])
        .expose_headers([HeaderName::from_static("x-instance-id")])
}

/// Session ids are UUIDs, as in the original; anything else is a client error.
fn session_id(raw: &str) -> Result<Uuid, AppError> {
    Uuid::try_parse(raw)
        .map_err(|_| AppError::BadRequest(format!("sessionId must be a UUID, got {raw:?}")))
}
