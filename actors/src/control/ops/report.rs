//! What an operator reads of the gateway: every sink's state and WAL
//! counts (`sinks.list`, `GET /admin/sinks`, the fleet state report), a
//! page of dead letters (`dlq.list`, the status page), the runtime
//! settings in force (`config.get`), and a sink's condition in one word.
//! Reads only: commands that change something stay in `ops.rs`.

use std::collections::BTreeMap;

use actix::Addr;
use serde_json::{json, Value};

use super::{OpError, Operator, DLQ_LIST_MAX};
use crate::dispatcher::GetSinkState;
use crate::route::SinkPolicy;
use crate::wal::{DlqFilter, WalStats};

impl Operator {
    /// The WAL's counts and every sink's state, as `sinks.list` (and so
    /// `GET /admin/sinks`) shows it: name, `running` (its dispatcher is
    /// alive; null on a stopped gateway), `state` (paused, circuit, failures
    /// in a row, settings), `condition` (one word: [`condition`]), `wal`
    /// (backlog, oldest pending, dead letters) and `last_error` (redacted). The fleet state report reads the same.
    pub async fn sinks_report(&self) -> Result<(WalStats, Value), OpError> {
        let stats = self.with_wal(|w| w.stats()).await?;
        let states = self.effective().await;
        let mut out = Vec::new();
        for (name, (_, disp)) in &self.p.sinks {
            let running = disp.as_ref().map(Addr::connected);
            out.push(json!({
                "name": name,
                "running": running,
                "condition": condition(running, &states["sinks"][name]),
                "state": states["sinks"][name],
                "wal": stats.sinks.get(name),
                "last_error": self.p.metrics.sink_last_error.get(name),
            }));
        }
        Ok((stats, Value::Array(out)))
    }

    /// The dead letters `f` selects, as `dlq.list` (and so `GET
    /// /admin/dlq`) lists them: the total matching, one page (`f.limit`,
    /// default 100) in seq order, and the seq to continue after. The status
    /// page reads the same, without an audit line per poll.
    pub fn dead_letters(
        &self,
        mut f: DlqFilter,
    ) -> Result<(u64, Vec<crate::wal::DeadLetter>, Option<u64>), OpError> {
        if let Some(s) = &f.sink {
            self.known_sink(s)?;
        }
        let limit = f.limit.unwrap_or(100).clamp(1, DLQ_LIST_MAX);
        f.limit = Some(limit);
        let reader = &self.p.reader;
        let total = reader.count_dead(&DlqFilter {
            after_seq: None,
            limit: None,
            ..f.clone()
        })?;
        let list = reader.list_dead(&f)?;
        let next = (list.len() as u64 == limit)
            .then(|| list.last().map(|d| d.seq))
            .flatten();
        Ok((total, list, next))
    }

    /// The runtime settings in force.
    pub(super) async fn effective(&self) -> Value {
        let o = self.overrides();
        let rate = o.rate_limit(self.p.base_rate);
        let mut sinks = serde_json::Map::new();
        for (name, (base, disp)) in &self.p.sinks {
            let live = match disp {
                Some(d) => d.send(GetSinkState).await.ok(),
                None => None,
            };
            let v = match live {
                Some(s) => serde_json::to_value(s).unwrap_or_default(),
                None => {
                    let mut d = base.clone();
                    o.apply_to(&mut d);
                    json!({
                        "paused": d.paused,
                        "retry_budget": d.retry_budget,
                        "retry_base_ms": d.retry_base.as_millis() as u64,
                        "retry_max_ms": d.retry_max.as_millis() as u64,
                        "budget": d.budget,
                        "quota": d.quota,
                        "windows": d.windows.as_ref().map(crate::uplink::Windows::to_json),
                        "live_share": d.live_share,
                        "reduce": d.reduce.as_ref().map(crate::reduce::Reduce::to_json),
                    })
                }
            };
            let mut v = v;
            if let (Some(base), Value::Object(m)) = (self.p.base_policies.get(name), &mut v) {
                m.extend(policy_json(&o.policy(name, base)));
            }
            sinks.insert(name.clone(), v);
        }
        json!({
            "log.level": o.log_level.clone().unwrap_or_else(|| self.p.base_log_level.clone()),
            "ingest.rate_limit_per_device": rate.per_second,
            "ingest.rate_limit_burst": rate.burst,
            "priority": o.priority.clone().unwrap_or_else(|| self.p.base_priority.clone()),
            "sinks": sinks,
        })
    }
}

/// A sink is up: its dispatcher runs (`running`; `None`: the gateway is
/// not running), its circuit is closed, its last attempt did not fail and
/// its last batch was not dead-lettered (as `gateway_sink_up`). The one
/// definition: the fleet state's `up`, what a bundle's probation keeps,
/// and [`condition`]'s `up`.
pub fn sink_up(running: Option<bool>, state: &Value) -> bool {
    let circuit_open = state["circuit_open"] == Value::Bool(true);
    let failing = state["consecutive_failures"].as_u64().unwrap_or(0) > 0;
    let rejecting = state["rejecting"] == Value::Bool(true);
    running == Some(true) && !circuit_open && !failing && !rejecting
}

/// A row of `GET /admin/sinks` (its `running` and `state`) is up
/// ([`sink_up`]).
pub fn sink_row_up(row: &Value) -> bool {
    sink_up(row["running"].as_bool(), &row["state"])
}

/// A sink's condition in one word, for people (the status page, `gateway
/// sink list`): `paused`, `circuit_open`, `rejecting` (its target
/// answers, but its last batch went to the dead letters: refused for good,
/// as with HTTP 400 or 401, or out of retries), `down` (its dispatcher is
/// not running, or its last publish failed), `up`, or `stopped` (the
/// gateway is not running: `running` is null).
pub fn condition(running: Option<bool>, state: &Value) -> &'static str {
    let failing = state["consecutive_failures"].as_u64().unwrap_or(0) > 0;
    match running {
        None => "stopped",
        Some(_) if state["paused"] == Value::Bool(true) => "paused",
        Some(_) if state["circuit_open"] == Value::Bool(true) => "circuit_open",
        Some(true) if state["rejecting"] == Value::Bool(true) && !failing => "rejecting",
        _ if sink_up(running, state) => "up",
        _ => "down",
    }
}

/// A sink's route, TTLs and drain order as settings (`config.get`).
fn policy_json(p: &SinkPolicy) -> serde_json::Map<String, Value> {
    let ttl: BTreeMap<&str, String> = p
        .ttl
        .iter()
        .map(|(c, d)| (c.as_str(), humantime::format_duration(*d).to_string()))
        .collect();
    let mut m = serde_json::Map::new();
    m.insert("route".into(), json!(p.route));
    m.insert("ttl".into(), json!(ttl));
    m.insert("drain".into(), json!(p.drain));
    m.insert(
        "live_after".into(),
        json!(humantime::format_duration(p.live_after).to_string()),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sinks_condition_says_paused_before_circuit_before_down() {
        let st = |paused: bool, open: bool, fails: u64| json!({"paused": paused, "circuit_open": open, "consecutive_failures": fails});
        let rejecting = |fails: u64| json!({"paused": false, "circuit_open": false, "consecutive_failures": fails, "rejecting": true});
        assert_eq!(condition(Some(true), &rejecting(0)), "rejecting");
        assert!(!sink_up(Some(true), &rejecting(0)));
        // Failing again (a retry): down, as any failing sink.
        assert_eq!(condition(Some(true), &rejecting(1)), "down");
        assert_eq!(condition(Some(false), &rejecting(0)), "down");
        assert_eq!(condition(Some(true), &st(false, false, 0)), "up");
        assert_eq!(condition(Some(true), &st(false, false, 2)), "down");
        assert_eq!(condition(Some(false), &st(false, false, 0)), "down");
        assert_eq!(condition(Some(true), &st(false, true, 5)), "circuit_open");
        assert_eq!(condition(Some(true), &st(true, true, 5)), "paused");
        assert_eq!(condition(None, &st(true, false, 0)), "stopped");
    }
}
