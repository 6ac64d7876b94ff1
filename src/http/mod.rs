//! The HTTP server: ingest, health, metrics, admin (DESIGN §4 I1b, I2).

pub mod admin;
mod error;
pub mod health;
mod ingest;
mod status;

use std::sync::Arc;

use actix::Addr;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use gateway_actors::control::Operator;
use gateway_actors::dispatcher::Dispatcher;
use gateway_actors::ingest::{IngestLimits, IngestRouters};
use gateway_actors::mqtt::MqttStatus;
use gateway_actors::wal::WalHealth;
use gateway_actors::Metrics;

pub use error::ApiError;

use crate::auth::{AdminAuth, DeviceAuth};

/// What every handler can reach.
pub struct AppState {
    /// Ingest door.
    pub router: IngestRouters,
    /// Device credentials.
    pub auth: DeviceAuth,
    /// Payload limits (checked before reading the body).
    pub limits: IngestLimits,
    /// WAL health for `/readyz`.
    pub wal_health: Arc<WalHealth>,
    /// Dispatchers by sink, for `/readyz`.
    pub dispatchers: Vec<(String, Addr<Dispatcher>)>,
    /// Metrics.
    pub metrics: Metrics,
    /// MQTT ingest connection state (`None` = MQTT off).
    pub mqtt: Option<Arc<MqttStatus>>,
    /// Admin credentials.
    pub admin: AdminAuth,
    /// Runs operator commands (admin API).
    pub operator: Arc<Operator>,
    /// A request must be read and answered within this (`http.request_timeout`).
    pub request_timeout: std::time::Duration,
    /// Client certificates are on (`http.client_ca_file`): ingest for a
    /// device needs a certificate whose CN or a DNS SAN is that device id.
    pub cert_identity: bool,
    /// The status document's source (`GET /admin/status`, the status page).
    pub status: Arc<crate::status::StatusSource>,
}

/// The verified client certificate's CN and DNS subject alternative names.
#[derive(Clone, Debug)]
pub struct PeerNames(pub Vec<String>);

/// The request's correlation id (from `X-Correlation-Id` or new).
#[derive(Clone, Debug)]
pub struct CorrelationId(pub String);

const CORRELATION_HEADER: &str = "x-correlation-id";

fn valid_correlation(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Gives every request a correlation id and puts it on every response.
pub async fn correlation(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_correlation(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(CorrelationId(id.clone()));
    let mut res = next.call(req).await?;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(HeaderName::from_static(CORRELATION_HEADER), v);
    }
    Ok(res)
}

/// Cuts a request that is not read and answered within
/// `http.request_timeout` (a body trickling in, a stalled client): 408 with
/// a JSON body, and the connection closes. Headers have the same deadline
/// in the server (`client_request_timeout`).
pub async fn deadline(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let limit = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.request_timeout)
        .unwrap_or(std::time::Duration::from_secs(10));
    match actix_rt::time::timeout(limit, next.call(req)).await {
        Ok(res) => res.map(ServiceResponse::map_into_boxed_body),
        Err(_) => Err(ApiError::new(
            actix_web::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request was not complete within {} (http.request_timeout)",
                humantime::format_duration(limit)
            ),
        )
        .into()),
    }
}

/// Registers the routes (used by the server and by tests).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/ingest/{device_id}", web::post().to(ingest::ingest))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/version", web::get().to(health::version))
        .configure(status::configure)
        .configure(admin::configure)
        .default_service(web::to(not_found));
}

async fn not_found(req: actix_web::HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", req.method(), req.path()),
    ))
}
