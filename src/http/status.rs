//! The operator's status page (DESIGN §12): `GET /` and its two assets,
//! compiled into the binary (no CDN, no build step: it works at a site
//! with no internet), and `GET /admin/status`, the one JSON document the
//! page polls and `gateway status` prints.
//!
//! The page itself is public and holds no data: it shows a sign-in form
//! until `/admin/status` answers, with the admin token (kept in
//! `sessionStorage`, sent as `Authorization: Bearer`, never in a URL) or an
//! admin client certificate. Its actions call the admin API's own endpoints,
//! so they run through the same `Operator` and audit log as the CLI.
//!
//! Every asset is sent with a strict Content-Security-Policy (no inline
//! script or style, no framing, requests to this origin only), `nosniff`
//! and `no-referrer`.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use super::admin::Admin;
use super::error::ApiError;
use super::AppState;

const INDEX_HTML: &str = include_str!("status/index.html");
const STATUS_JS: &str = include_str!("status/status.js");
const STATUS_CSS: &str = include_str!("status/status.css");

/// The page's Content-Security-Policy: scripts, styles and requests from
/// this origin only; images only as `data:` URLs (the empty favicon).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; \
base-uri 'none'";

/// Registers `/`, the assets and `/admin/status`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/status.js", web::get().to(script))
        .route("/status.css", web::get().to(style))
        .route("/admin/status", web::get().to(status));
}

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", STATUS_JS)
}

async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STATUS_CSS)
}

/// `GET /admin/status`: the status document ([`crate::status`]).
async fn status(_who: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let doc = state.status.document(&state.operator).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(doc))
}
