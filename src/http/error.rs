//! The JSON error body every failed request gets:
//! `{"error":{"code":"…","message":"…"}}`.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use gateway_actors::ingest::IngestError;
use serde_json::json;

/// An HTTP error with a stable code and a message for people.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `Retry-After` seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after {
            r.insert_header(("Retry-After", s.to_string()));
        }
        r.json(json!({"error": {"code": self.code, "message": self.message}}))
    }
}

/// The status of each way an ingest can fail.
impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Rejected(r) => {
                let status = if r.reason == "too_large" {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                };
                ApiError::new(status, r.reason, r.message)
            }
            IngestError::RateLimited { retry_after, .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "device is over its rate limit",
            )
            .retry_after(retry_after.as_secs_f64().ceil() as u64),
            IngestError::Backpressure(why) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backpressure", why).retry_after(5)
            }
            IngestError::Unavailable(why) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", why)
                    .retry_after(1)
            }
        }
    }
}
