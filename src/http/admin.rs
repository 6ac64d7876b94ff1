//! `/admin/...` (DESIGN §4 I2): the operator's API. Every route needs the
//! admin token (`Authorization: Bearer …`) or, with HTTPS client
//! authentication, a client certificate with the admin CN; a device token
//! gets 403. Every action runs through the shared `Operator`, so it is
//! counted and audit-logged exactly like the MQTT control plane and the CLI.

use std::future::{ready, Ready};

use actix_web::http::{header, StatusCode};
use actix_web::web::Bytes;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use gateway_actors::control::{Command, OpError};
use gateway_actors::wal::DlqFilter;
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::auth::AdminDecision;

/// The verified client certificate's common name (set per connection).
#[derive(Clone, Debug)]
pub struct PeerCn(pub String);

/// An authenticated admin; holds the audit name of the credential.
pub struct Admin(String);

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "no application state",
            )));
        };
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let cn = req.conn_data::<PeerCn>().map(|p| p.0.as_str());
        ready(match state.admin.check(auth, cn, &state.auth) {
            AdminDecision::Allow(who) => Ok(Admin(format!("admin-http:{who}"))),
            AdminDecision::Unauthenticated(m) => {
                tracing::warn!(target: "audit", path = %req.path(), outcome = "denied", reason = m, "admin request refused");
                Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m))
            }
            AdminDecision::Forbidden(m) => {
                tracing::warn!(target: "audit", path = %req.path(), outcome = "denied", reason = %m, "admin request refused");
                Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", m))
            }
        })
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let status = match e {
            OpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OpError::UnknownSink(_) | OpError::UnknownCommand(_) => StatusCode::NOT_FOUND,
            OpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            OpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

/// Registers the admin routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin")
            .route("/wal", web::get().to(wal_stats))
            .route("/wal/check", web::get().to(wal_check))
            .route("/wal/repair", web::post().to(wal_repair))
            .route("/wal/compact", web::post().to(wal_compact))
            .route("/sinks", web::get().to(sinks))
            .route("/sinks/{name}/pause", web::post().to(sink_pause))
            .route("/sinks/{name}/resume", web::post().to(sink_resume))
            .route("/dlq", web::get().to(dlq_list))
            .route("/dlq", web::delete().to(dlq_purge))
            .route("/dlq/export", web::get().to(dlq_export))
            .route("/dlq/requeue", web::post().to(dlq_requeue))
            .route("/replay", web::post().to(replay))
            .route("/config", web::get().to(config_get))
            .route("/config", web::post().to(config_set))
            .route(
                "/devices/{device_id}/control",
                web::post().to(device_control),
            )
            .route("/commands/{command}", web::post().to(command)),
    );
}

async fn run(state: &AppState, who: &Admin, cmd: Command) -> Result<HttpResponse, ApiError> {
    let v = state.operator.execute(cmd, &who.0).await?;
    Ok(HttpResponse::Ok().json(v))
}

/// A JSON body, or none (an empty body is `null`).
fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// The dead-letter filter from the query string: the parameters become a
/// JSON object of strings, so the same rules apply as for JSON bodies.
fn filter(q: &str) -> Result<DlqFilter, ApiError> {
    let bad = |e: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("query: {e}"),
        )
    };
    let params = web::Query::<serde_json::Map<String, Value>>::from_query(q)
        .map_err(|e| bad(e.to_string()))?;
    serde_json::from_value(Value::Object(params.into_inner())).map_err(|e| bad(e.to_string()))
}

async fn wal_stats(who: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::WalStats).await
}

async fn wal_check(who: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::WalCheck { repair: false }).await
}

async fn wal_repair(who: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::WalCheck { repair: true }).await
}

async fn wal_compact(who: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::WalCompact).await
}

async fn sinks(who: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::SinksList).await
}

async fn sink_pause(
    who: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::SinkPause(path.into_inner())).await
}

async fn sink_resume(
    who: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::SinkResume(path.into_inner())).await
}

async fn dlq_list(
    who: Admin,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let f = filter(req.query_string())?;
    run(&state, &who, Command::DlqList(f)).await
}

async fn dlq_purge(
    who: Admin,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let f = filter(req.query_string())?;
    run(&state, &who, Command::DlqPurge(f)).await
}

async fn dlq_requeue(
    who: Admin,
    body: Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let cmd = Command::parse("dlq.requeue", body_json(&body)?)?;
    run(&state, &who, cmd).await
}

async fn replay(
    who: Admin,
    body: Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let cmd = Command::parse("replay", body_json(&body)?)?;
    run(&state, &who, cmd).await
}

async fn config_get(who: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    run(&state, &who, Command::ConfigGet).await
}

async fn config_set(
    who: Admin,
    body: Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let cmd = Command::parse("config.set", body_json(&body)?)?;
    run(&state, &who, cmd).await
}

async fn device_control(
    who: Admin,
    path: web::Path<String>,
    body: Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let payload = body_json(&body)?;
    let cmd = Command::DeviceSend {
        device_id: path.into_inner(),
        payload,
    };
    run(&state, &who, cmd).await
}

/// `POST /admin/commands/{command}` with the command's JSON arguments: every
/// control-plane command over HTTP (what the CLI uses on a running gateway).
async fn command(
    who: Admin,
    path: web::Path<String>,
    body: Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let cmd = Command::parse(&path, body_json(&body)?)?;
    run(&state, &who, cmd).await
}

/// The response body's sender as an `io::Write` (each write is one chunk;
/// a `BufWriter` in front makes them ~64 KiB).
struct ChunkSender(tokio::sync::mpsc::Sender<Result<Bytes, String>>);

impl std::io::Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `GET /admin/dlq/export?sink=…`: every matching dead letter as NDJSON,
/// streamed from a read-only connection (memory does not grow with the
/// count, and the WAL writer is never held up).
async fn dlq_export(
    who: Admin,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let f = filter(req.query_string())?;
    let reader = state.operator.reader().clone();
    let total = reader.count_dead(&f).map_err(OpError::from)?;
    tracing::info!(target: "audit", actor = %who.0, command = "dlq.export", args = ?f, total, outcome = "ok", "operator command");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(16);
    std::thread::Builder::new()
        .name("dlq-export".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, ChunkSender(tx.clone()));
            if let Err(e) = reader.export_ndjson(&f, &mut out, |_| {}) {
                tracing::warn!(error = %e, "dead-letter export ended early");
                let _ = tx.blocking_send(Err(e.to_string()));
            }
        })
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|item| (item.map_err(actix_web::error::ErrorInternalServerError), rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("X-Total-Count", total.to_string()))
        .streaming(stream))
}
