//! What the server says about itself: the demo page at `/` (one self-contained HTML
//! file compiled into the binary, no build step, no CDN: the first thing a newcomer
//! sees after `cargo run`) and the OpenAPI description at `/openapi.json`.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

const PAGE: &str = include_str!("../../static/index.html");
const OPENAPI: &str = include_str!("../../static/openapi.json");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/openapi.json", get(openapi))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
