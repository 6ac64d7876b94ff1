//! `POST /ingest/{device_id}` (DESIGN §4 I1b): 202 only after the WAL commit.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use gateway_actors::ingest::{
    IngestError, IngestTelemetry, PayloadFormat, RecordReceipt, Rejection, Source,
};
use gateway_actors::repeats::{self, Kind};
use gateway_actors::trace;
use serde::Serialize;

use super::error::ApiError;
use super::{AppState, CorrelationId};
use crate::auth::AuthDecision;

fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn is_json(req: &HttpRequest) -> bool {
    header_str(req, header::CONTENT_TYPE.as_str())
        .and_then(|ct| ct.split(';').next())
        .map(|m| m.trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false)
}

/// Accepts one telemetry object or a JSON array of them for `device_id`.
///
/// This handler checks what only HTTP knows (credentials, content type,
/// size) and maps the outcome to a status; the [`IngestCore`] validates
/// the device id, the idempotency key and the records, and counts and logs
/// every reject (through [`IngestCore::reject`], also for the refusals here).
///
/// [`IngestCore`]: gateway_actors::ingest::IngestCore
pub async fn ingest(
    req: HttpRequest,
    path: web::Path<String>,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let device_id = path.into_inner();
    let correlation_id = req
        .extensions()
        .get::<CorrelationId>()
        .map(|c| c.0.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    // A child of the request span, which continues the `traceparent` header.
    let span = trace::ingest_span(Source::Http.as_str(), &device_id, &correlation_id, None);
    let reject = |status, reason, message: String| {
        let r = Rejection { reason, message };
        state
            .router
            .reject(Source::Http, &device_id, &correlation_id, &r);
        ApiError::new(status, r.reason, r.message)
    };

    // Device identity (README "Device credentials"): with client
    // certificates on, the certificate names the device; with tokens
    // configured, the token must be the device's too.
    if state.cert_identity {
        let names = req.conn_data::<crate::http::PeerNames>();
        match names {
            Some(n) if n.0.contains(&device_id) => {}
            Some(n) => {
                return Err(reject(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "the client certificate ({}) is not device {device_id}: its CN or a DNS subject alternative name must be the device id",
                        n.0.first().map_or("no CN".to_string(), |cn| format!("CN={cn}"))
                    ),
                ))
            }
            None => {
                return Err(reject(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a client certificate naming the device is required".into(),
                ))
            }
        }
    }
    match state
        .auth
        .check(header_str(&req, header::AUTHORIZATION.as_str()), &device_id)
    {
        AuthDecision::Allow => {}
        AuthDecision::Unauthenticated(why) => {
            return Err(reject(StatusCode::UNAUTHORIZED, "unauthorized", why.into()))
        }
        AuthDecision::Forbidden => {
            return Err(reject(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("these credentials may not publish as device {device_id}"),
            ))
        }
    }
    if !is_json(&req) {
        return Err(reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json".into(),
        ));
    }
    let limit = state.limits.max_payload_bytes;
    let too_large = || format!("payload exceeds the limit of {limit} bytes");
    if let Some(len) =
        header_str(&req, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                too_large(),
            ));
        }
    }
    let idempotency_key = header_str(&req, "Idempotency-Key").map(str::to_string);
    // Checked by the core, with the MQTT user property's.
    let traceparent = header_str(&req, "traceparent").map(str::to_string);

    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| reject(StatusCode::BAD_REQUEST, "bad_body", e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                too_large(),
            ));
        }
        body.extend_from_slice(&chunk);
    }

    let msg = IngestTelemetry {
        source: Source::Http,
        device_id: device_id.clone(),
        payload: body.freeze(),
        payload_format: PayloadFormat::Json,
        correlation_id: correlation_id.clone(),
        idempotency_key,
        traceparent,
        span: span.clone(),
        topic_tags: Vec::new(),
    };
    // Checked here, on this worker's thread: the first other thread is the
    // WAL writer's.
    let receipt = state.router.ingest(msg).await.map_err(|e| {
        if let IngestError::Unavailable(why) = &e {
            if repeats::admit(Kind::IngestUnavailable, "http") {
                tracing::warn!(device_id = %device_id, correlation_id = %correlation_id, error = %why, "ingest not stored");
            }
        }
        ApiError::from(e)
    })?;

    let all_dup = receipt.records.iter().all(|r| r.duplicate);
    let status = if all_dup {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    // Typed answers: no intermediate `serde_json::Value` per request.
    let res = if receipt.batch {
        let duplicates = receipt.records.iter().filter(|r| r.duplicate).count();
        serde_json::to_vec(&BatchAnswer {
            status: "accepted",
            correlation_id: &correlation_id,
            count: receipt.records.len(),
            duplicates,
            duplicate: all_dup,
            records: &receipt.records,
        })
    } else {
        let r = &receipt.records[0];
        serde_json::to_vec(&RecordAnswer {
            status: "accepted",
            correlation_id: &r.correlation_id,
            seq: r.seq,
            duplicate: r.duplicate.then_some(true),
        })
    };
    let body = res
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(HttpResponse::build(status)
        .insert_header(header::ContentType::json())
        .body(body))
}

/// The answer to one record.
#[derive(Serialize)]
struct RecordAnswer<'a> {
    status: &'static str,
    correlation_id: &'a str,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
}

/// The answer to a JSON array of records.
#[derive(Serialize)]
struct BatchAnswer<'a> {
    status: &'static str,
    correlation_id: &'a str,
    count: usize,
    duplicates: usize,
    duplicate: bool,
    records: &'a [RecordReceipt],
}
