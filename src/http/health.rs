//! `GET /healthz`, `/readyz`, `/version`.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::AppState;

/// Liveness: the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: the WAL is writable and below backpressure, the dispatchers
/// run, and MQTT ingest is connected or disabled. The body names every
/// check; `checks.wal.full_in` says when the WAL would be full (details
/// only: it never makes the gateway unready).
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match readiness(&state) {
        Ok(checks) => HttpResponse::Ok().json(json!({"status": "ready", "checks": checks})),
        Err((failing, checks)) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "not_ready", "failing": failing, "checks": checks})),
    }
}

/// The readiness checks: `Ok(checks)` when ready, else the failing
/// checks' names and every check (`/readyz`, and a bundle's probation).
pub fn readiness(state: &AppState) -> Result<Value, (Vec<&'static str>, Value)> {
    let h = &state.wal_health;
    let problem = || h.last_problem.lock().ok().and_then(|g| g.clone());
    let wal_ok = h.alive.load(Ordering::SeqCst) && h.writable.load(Ordering::SeqCst);
    let bp = h.backpressure.load(Ordering::SeqCst);
    let mut wal = if !wal_ok {
        json!({"ok": false, "detail": problem().unwrap_or_else(|| "WAL writer not running".into())})
    } else {
        json!({"ok": true})
    };
    // Time until the WAL is full at its current net growth (null while it
    // does not grow): an outage turning into a full disk, hours ahead.
    wal["full_in"] = state
        .metrics
        .wal_growth
        .full_in()
        .map_or(Value::Null, |f| f.to_json());
    let backpressure = if bp {
        json!({"ok": false, "detail": problem().unwrap_or_else(|| "backpressure active".into())})
    } else {
        json!({"ok": true})
    };
    let dead: Vec<&str> = state
        .dispatchers
        .iter()
        .filter(|(_, a)| !a.connected())
        .map(|(n, _)| n.as_str())
        .collect();
    let dispatcher = if state.dispatchers.is_empty() || dead.len() == state.dispatchers.len() {
        json!({"ok": false, "detail": "no dispatcher is running"})
    } else if dead.is_empty() {
        json!({"ok": true, "sinks": state.dispatchers.len()})
    } else {
        json!({"ok": true, "detail": format!("not running: {}", dead.join(", "))})
    };
    let mqtt = match &state.mqtt {
        None => json!({"ok": true, "detail": "disabled"}),
        Some(st) if st.connected.load(Ordering::SeqCst) => {
            json!({"ok": true, "detail": "connected"})
        }
        Some(st) => {
            let why = st
                .last_error
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| "connecting".into());
            json!({"ok": false, "detail": format!("not connected: {why}")})
        }
    };
    let checks =
        json!({"wal": wal, "backpressure": backpressure, "dispatcher": dispatcher, "mqtt": mqtt});
    let ready = ["wal", "backpressure", "dispatcher", "mqtt"]
        .iter()
        .all(|k| checks[k]["ok"] == Value::Bool(true));
    let failing: Vec<&str> = ["wal", "backpressure", "dispatcher", "mqtt"]
        .into_iter()
        .filter(|k| checks[k]["ok"] != Value::Bool(true))
        .collect();
    if ready {
        Ok(checks)
    } else {
        Err((failing, checks))
    }
}

/// Version, git commit and build time.
pub async fn version() -> HttpResponse {
    HttpResponse::Ok().json(crate::version_info())
}
