//! The one place where errors become HTTP responses: a status code and a JSON body
//! `{"code": "...", "message": "..."}` (the original's shape). Details of server-side
//! failures go to the log, not to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::broker::BrokerError;
use crate::registry::AttachError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: malformed id, body or header.
    #[error("{0}")]
    BadRequest(String),
    /// 401: the publish API needs `Authorization: Bearer <PUBLISH_TOKEN>`.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 403: without `PUBLISH_TOKEN`, only direct local clients may publish.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 415: a body that is not `Content-Type: application/json`.
    #[error("the body must be sent as Content-Type: application/json")]
    UnsupportedMediaType,
    /// 413: the body is larger than `MAX_MESSAGE_BYTES`.
    #[error("the body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// 204: the session ended; tells EventSource to stop reconnecting.
    #[error("the session has ended")]
    SessionEnded,
    /// 429 with `Retry-After`: this client holds its share (streams, new sessions).
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u32,
    },
    /// 503 with `Retry-After`: a limit is reached or the broker is unavailable.
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after_secs: u32,
    },
}

impl AppError {
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            Self::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE")
            }
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            Self::SessionEnded => (StatusCode::NO_CONTENT, "SESSION_ENDED"),
            Self::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE"),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_REQUESTS"),
        }
    }
}

impl From<crate::class::BadParameter> for AppError {
    fn from(e: crate::class::BadParameter) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<AttachError> for AppError {
    fn from(e: AttachError) -> Self {
        let retry_after_secs = match &e {
            AttachError::Ended => return Self::SessionEnded,
            AttachError::TooManyClientStreams | AttachError::TooManyNewSessions => {
                return Self::TooManyRequests {
                    message: e.to_string(),
                    retry_after_secs: 5,
                };
            }
            AttachError::Broker(inner) => {
                tracing::warn!(error = %inner, "subscribe failed");
                2
            }
            AttachError::ShuttingDown => 1,
            _ => 5,
        };
        Self::Unavailable {
            message: e.to_string(),
            retry_after_secs,
        }
    }
}

impl From<BrokerError> for AppError {
    fn from(e: BrokerError) -> Self {
        tracing::warn!(error = %e, "publish failed");
        Self::Unavailable {
            message: "the broker is unavailable".into(),
            retry_after_secs: 2,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = self.code();
        if status == StatusCode::NO_CONTENT {
            return status.into_response();
        }
        let body = serde_json::json!({ "code": code, "message": self.to_string() });
        let mut response = (status, Json(body)).into_response();
        if let Self::Unavailable {
            retry_after_secs, ..
        }
        | Self::TooManyRequests {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}
