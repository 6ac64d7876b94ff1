//! What an operator does with a dispatcher: pause and resume
//! ([`SetPaused`]), change the retry settings ([`SetRetry`]), read its
//! state ([`GetSinkState`] → [`SinkState`], `GET /admin/sinks`) and ask
//! whether it runs ([`IsRunning`], `/readyz`). The uplink and reduction
//! settings have their own rooms (`gate.rs`, `reduction.rs`).

use std::time::Duration;

use actix::prelude::*;

use super::Dispatcher;
use crate::reduce::Reduce;
use crate::uplink::{Budget, Quota, TokenBucket, Windows};

/// Pauses (`true`) or resumes (`false`) delivery; a batch already being
/// published finishes first.
pub struct SetPaused(pub bool);
impl Message for SetPaused {
    type Result = ();
}
impl Handler<SetPaused> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetPaused, ctx: &mut Context<Self>) {
        if self.paused != msg.0 {
            tracing::info!(sink = %self.cfg.sink, paused = msg.0, "sink delivery {}", if msg.0 { "paused" } else { "resumed" });
        }
        self.paused = msg.0;
        self.metrics
            .sink_paused
            .with_label_values(&[&self.cfg.sink])
            .set(msg.0 as i64);
        if !msg.0 {
            self.step(ctx);
        }
    }
}

/// Changes the retry settings at run time (control plane `config.set`);
/// `None` keeps a value. Applies from the next failure on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetRetry {
    /// Attempts per batch before Dead (>= 1).
    pub retry_budget: Option<u32>,
    /// First backoff delay.
    pub retry_base: Option<Duration>,
    /// Largest backoff delay.
    pub retry_max: Option<Duration>,
}
impl Message for SetRetry {
    type Result = ();
}
impl Handler<SetRetry> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetRetry, _: &mut Context<Self>) {
        if let Some(b) = msg.retry_budget {
            self.cfg.retry_budget = b.max(1);
        }
        if let Some(d) = msg.retry_base {
            self.cfg.retry_base = d.max(Duration::from_millis(1));
        }
        if let Some(d) = msg.retry_max {
            self.cfg.retry_max = d.max(self.cfg.retry_base);
        }
        tracing::info!(
            sink = %self.cfg.sink,
            retry_budget = self.cfg.retry_budget,
            retry_base_ms = self.cfg.retry_base.as_millis() as u64,
            retry_max_ms = self.cfg.retry_max.as_millis() as u64,
            "sink retry settings changed"
        );
    }
}

/// What an operator sees of a sink (`GET /admin/sinks`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SinkState {
    /// Delivery is paused.
    pub paused: bool,
    /// The circuit breaker is open (the target looks down).
    pub circuit_open: bool,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
    /// Its last batch went to the dead letters (refused for good, or out
    /// of retries) and none was delivered since: the target answers, but
    /// not with an acceptance.
    #[serde(default)]
    pub rejecting: bool,
    /// A batch is being fetched or published.
    pub busy: bool,
    /// Attempts per batch before Dead.
    pub retry_budget: u32,
    /// First backoff delay, ms.
    pub retry_base_ms: u64,
    /// Largest backoff delay, ms.
    pub retry_max_ms: u64,
    /// The byte budget in force (`null`: none).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The quota in force (`null`: none).
    #[serde(default)]
    pub quota: Option<Quota>,
    /// The send windows in force (`null`: none).
    #[serde(default)]
    pub windows: Option<serde_json::Value>,
    /// The share of the budget kept for live records (`null`: none).
    #[serde(default)]
    pub live_share: Option<serde_json::Value>,
    /// Bytes spent of the quota in the current period.
    #[serde(default)]
    pub quota_spent_bytes: Option<u64>,
    /// Report-by-exception in force (`null`: none).
    #[serde(default)]
    pub reduce: Option<serde_json::Value>,
}

/// Reads the dispatcher's state.
pub struct GetSinkState;
impl Message for GetSinkState {
    type Result = SinkState;
}
impl Handler<GetSinkState> for Dispatcher {
    type Result = MessageResult<GetSinkState>;
    fn handle(&mut self, _: GetSinkState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(SinkState {
            paused: self.paused,
            circuit_open: self.circuit_open,
            consecutive_failures: self.consecutive_failures,
            rejecting: self.rejecting,
            busy: self.busy,
            retry_budget: self.cfg.retry_budget,
            retry_base_ms: self.cfg.retry_base.as_millis() as u64,
            retry_max_ms: self.cfg.retry_max.as_millis() as u64,
            budget: self.bucket.as_ref().map(TokenBucket::budget),
            quota: self.cfg.quota,
            windows: self.cfg.windows.as_ref().map(Windows::to_json),
            live_share: self.cfg.live_share.map(serde_json::Value::from),
            quota_spent_bytes: self.cfg.quota.and(self.spent.map(|s| s.spent_bytes)),
            reduce: self.cfg.reduce.as_ref().map(Reduce::to_json),
        })
    }
}

/// Asks whether the loop is running (for `/readyz`).
pub struct IsRunning;
impl Message for IsRunning {
    type Result = bool;
}
impl Handler<IsRunning> for Dispatcher {
    type Result = bool;
    fn handle(&mut self, _: IsRunning, _: &mut Context<Self>) -> bool {
        true
    }
}
