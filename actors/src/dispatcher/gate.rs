//! What a sink may send now (DESIGN §6b): the byte budget's token bucket,
//! the quota and its reserve for `high`, per-class send windows and the
//! backlog's share under `live_share`, applied by the [`Dispatcher`] before
//! each fetch and charged after each batch; and the runtime settings that
//! change them ([`SetBudget`], [`SetQuota`], [`SetWindows`], [`SetLive`],
//! [`SetLiveShare`]). The rules themselves (buckets, periods, windows) are
//! in `crate::uplink`; this room is the dispatcher's side of them.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Span;

use super::Dispatcher;
use crate::route::Class;
use crate::uplink::{Allowance, Budget, Quota, TokenBucket, Windows};
use crate::wal::{now_ms, Batch};

/// Under a quota, the first batch's records (its wire bytes per record
/// size the batches after it).
const QUOTA_PROBE_RECORDS: usize = 16;

impl Dispatcher {
    /// How long the byte budget holds the backlog (zero: not held); moves
    /// `gateway_sink_held_records{reason="budget"}`.
    pub(super) fn budget_hold(&mut self) -> Duration {
        let hold = self
            .bucket
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(Instant::now()));
        self.set_held("budget", !hold.is_zero());
        hold
    }

    /// The classes that may go now (the quota's, inside their windows) and,
    /// while a backlog over its share of the budget waits, the cutoff below
    /// which records are backlog; or, when nothing may go (the quota not
    /// loaded yet or spent, every class outside its windows), how long to
    /// wait before looking again.
    pub(super) fn gate(&mut self) -> Result<([bool; 3], Option<i64>), Duration> {
        let allowance = match (self.cfg.quota, self.spent.as_mut()) {
            (None, _) => Allowance::All,
            // Not loaded yet: nothing goes before the spent bytes are known.
            (Some(_), None) => return Err(Duration::from_millis(20)),
            (Some(q), Some(spent)) => {
                spent.roll(&q, now_ms());
                let a = spent.allowance(&q);
                self.metrics
                    .sink_quota_period_end
                    .with_label_values(&[&self.cfg.sink])
                    .set(spent.period_end_ms(&q) / 1000);
                self.metrics
                    .sink_quota_remaining
                    .with_label_values(&[&self.cfg.sink])
                    .set(
                        q.bytes
                            .saturating_sub(spent.spent_bytes)
                            .min(i64::MAX as u64) as i64,
                    );
                a
            }
        };
        self.set_held("quota", allowance != Allowance::All);
        // The classes that may go now: the quota's, inside their windows.
        let minute = crate::uplink::local_minute();
        let mut allowed = [allowance == Allowance::All; 3];
        allowed[Class::High as usize] = allowance != Allowance::Nothing;
        let mut outside = false;
        if let Some(w) = &self.cfg.windows {
            for c in Class::ALL {
                outside |= !w.allows(c, minute);
                allowed[c as usize] &= w.allows(c, minute);
            }
        }
        self.set_held("window", outside);
        if allowance == Allowance::Nothing || allowed == [false; 3] {
            // Look again at the period's end, or when a window may open.
            let until = match (allowance, self.spent.zip(self.cfg.quota)) {
                (Allowance::Nothing, Some((s, q))) => {
                    (s.period_end_ms(&q) - now_ms()).clamp(10, 5_000)
                }
                _ => 5_000,
            };
            return Err(Duration::from_millis(until as u64));
        }
        // With live_share, a backlog over its share of the budget waits: only
        // live records go until the backlog's bucket is paid back.
        let cutoff = self.live_cutoff();
        let backlog_waits = self
            .backlog_bucket
            .as_mut()
            .is_some_and(|b| !b.wait(Instant::now()).is_zero());
        Ok((allowed, cutoff.filter(|_| backlog_waits)))
    }

    /// Only some classes may go now (the quota's reserve is all that is
    /// left: only `high`; a class outside its windows): the batch's records
    /// of those classes go, the others go back to the WAL and wait (they
    /// are fetched again on the next pass).
    pub(super) fn publish_classes(
        &mut self,
        batch: Batch,
        allowed: [bool; 3],
        live_only: Option<i64>,
        span: Span,
        ctx: &mut Context<Self>,
    ) {
        let high: Vec<_> = batch
            .records
            .iter()
            .filter(|r| allowed[r.class as usize] && live_only.is_none_or(|c| r.receive_ms >= c))
            .cloned()
            .collect();
        let seqs: Vec<u64> = high.iter().map(|r| r.seq).collect();
        let release = self
            .wal
            .release(self.cfg.sink.clone(), subtract(&batch.ranges, &seqs));
        let high = Batch {
            sink: batch.sink,
            ranges: runs(&seqs),
            records: high,
        };
        ctx.spawn(release.into_actor(self).map(move |_, act, ctx| {
            if high.records.is_empty() {
                act.wait_for_records(Duration::from_secs(1), 1, ctx);
            } else {
                act.deliver(high, span, ctx);
            }
        }));
    }

    /// Records per batch: `batch_max_records`, and at the recent wire bytes
    /// per record:
    /// - under a budget no more than its burst holds, so one batch's debt
    ///   (and the wait of a `high` record behind it) stays near
    ///   `burst_bytes / bytes_per_s`;
    /// - under a quota no more than what is left of the share the batch may
    ///   spend (the normal share, or the reserve once only `high` goes), so
    ///   a large batch never spends the reserve that `high` is kept for
    ///   (until the bytes per record are known, [`QUOTA_PROBE_RECORDS`]).
    pub(super) fn fetch_size(&self) -> usize {
        let max = self.cfg.batch_max_records;
        // Before the first batch: ~300 B a record (uncompressed telemetry).
        let per = self.wire_per_record.unwrap_or(300.0).max(1.0);
        let mut n = max;
        if let Some(b) = &self.bucket {
            n = n.min((b.budget().burst_bytes as f64 / per) as usize);
        }
        if let (Some(q), Some(s)) = (self.cfg.quota, self.spent) {
            let normal_left = q
                .bytes
                .saturating_sub(q.reserve_high)
                .saturating_sub(s.spent_bytes);
            let left = if normal_left > 0 {
                normal_left
            } else {
                q.bytes.saturating_sub(s.spent_bytes)
            };
            n = n.min((left as f64 / per).ceil() as usize);
            if self.wire_per_record.is_none() {
                // Learn the bytes per record on a small batch first.
                n = n.min(QUOTA_PROBE_RECORDS);
            }
        }
        n.clamp(1, max)
    }

    /// Records received before this (epoch ms) are the backlog, while the
    /// sink drains live-first with a `live_share`.
    pub(super) fn live_cutoff(&self) -> Option<i64> {
        self.backlog_bucket.as_ref()?;
        Some(now_ms() - self.live_after?.as_millis() as i64)
    }

    /// Builds, changes or drops the backlog's bucket after a change of the
    /// budget, `live_share` or the drain order.
    pub(super) fn update_backlog_bucket(&mut self) {
        let want = match (self.cfg.budget, self.cfg.live_share, self.live_after) {
            (Some(b), Some(share), Some(_)) => Some(Budget {
                bytes_per_s: ((b.bytes_per_s as f64 * (1.0 - share)) as u64).max(1),
                burst_bytes: ((b.burst_bytes as f64 * (1.0 - share)) as u64).max(1),
            }),
            _ => None,
        };
        let now = Instant::now();
        match (want, self.backlog_bucket.as_mut()) {
            (None, _) => self.backlog_bucket = None,
            (Some(w), Some(b)) => b.set_budget(w, now),
            (Some(w), None) => self.backlog_bucket = Some(TokenBucket::new(w, now)),
        }
    }

    /// Counts `bytes` against the quota and persists what was spent.
    pub(super) fn spend_quota(&mut self, bytes: u64) {
        let (Some(q), Some(spent)) = (self.cfg.quota, self.spent.as_mut()) else {
            return;
        };
        spent.roll(&q, now_ms());
        spent.spent_bytes += bytes;
        self.metrics
            .sink_quota_remaining
            .with_label_values(&[&self.cfg.sink])
            .set(
                q.bytes
                    .saturating_sub(spent.spent_bytes)
                    .min(i64::MAX as u64) as i64,
            );
        if let Some(dir) = &self.quota_dir {
            if let Err(e) = spent.save(dir, &self.cfg.sink) {
                tracing::warn!(sink = %self.cfg.sink, error = %e, "cannot persist the quota spent");
            }
        }
    }

    /// `gateway_sink_held_records{sink,reason}`: while held, the sink's
    /// whole backlog (its enqueued records) waits for `reason`.
    pub(super) fn set_held(&self, reason: &str, held: bool) {
        let n = if held {
            self.metrics
                .wal_records
                .with_label_values(&[&self.cfg.sink, "enqueued"])
                .get()
        } else {
            0
        };
        self.metrics
            .sink_held_records
            .with_label_values(&[&self.cfg.sink, reason])
            .set(n);
    }
}

/// Sets or clears the byte budget at run time (`config.set
/// sinks.NAME.budget`); a bucket in debt keeps its debt.
pub struct SetBudget(pub Option<Budget>);
impl Message for SetBudget {
    type Result = ();
}
impl Handler<SetBudget> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetBudget, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.cfg.budget = msg.0;
        match (msg.0, &mut self.bucket) {
            (None, _) => self.bucket = None,
            (Some(b), Some(bucket)) => bucket.set_budget(b, now),
            (Some(b), None) => self.bucket = Some(TokenBucket::new(b, now)),
        }
        self.update_backlog_bucket();
        tracing::info!(sink = %self.cfg.sink, budget = ?msg.0, "sink byte budget changed");
        if msg.0.is_none() {
            self.set_held("budget", false);
            self.step(ctx);
        }
    }
}

/// Sets or clears the quota at run time (`config.set sinks.NAME.quota`);
/// what was spent in the period is kept.
pub struct SetQuota(pub Option<Quota>);
impl Message for SetQuota {
    type Result = ();
}
impl Handler<SetQuota> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetQuota, ctx: &mut Context<Self>) {
        self.cfg.quota = msg.0;
        tracing::info!(sink = %self.cfg.sink, quota = ?msg.0, "sink quota changed");
        if msg.0.is_none() {
            self.set_held("quota", false);
        }
        self.step(ctx);
    }
}

/// Tells the dispatcher the sink's drain order: `Some(live_after)` while
/// it drains live-first (what `live_share` needs to tell live from backlog).
pub struct SetLive(pub Option<Duration>);
impl Message for SetLive {
    type Result = ();
}
impl Handler<SetLive> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetLive, _: &mut Context<Self>) {
        self.live_after = msg.0;
        self.update_backlog_bucket();
    }
}

/// Sets or clears `live_share` at run time (`config.set sinks.NAME.live_share`).
pub struct SetLiveShare(pub Option<f64>);
impl Message for SetLiveShare {
    type Result = ();
}
impl Handler<SetLiveShare> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetLiveShare, ctx: &mut Context<Self>) {
        tracing::info!(sink = %self.cfg.sink, live_share = ?msg.0, "sink live_share changed");
        self.cfg.live_share = msg.0;
        self.update_backlog_bucket();
        self.step(ctx);
    }
}

/// Sets or clears the send windows at run time (`config.set sinks.NAME.windows`).
pub struct SetWindows(pub Option<Windows>);
impl Message for SetWindows {
    type Result = ();
}
impl Handler<SetWindows> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetWindows, ctx: &mut Context<Self>) {
        tracing::info!(sink = %self.cfg.sink, windows = ?msg.0, "sink send windows changed");
        self.cfg.windows = msg.0;
        self.step(ctx);
    }
}

/// `ranges` without the seqs in `seqs` (sorted).
fn subtract(ranges: &[(u64, u64)], seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, b) in ranges {
        let mut from = a;
        for &s in seqs.iter().filter(|&&s| s >= a && s <= b) {
            if s > from {
                out.push((from, s - 1));
            }
            from = s + 1;
        }
        if from <= b {
            out.push((from, b));
        }
    }
    out
}

/// Sorted seqs as runs of consecutive ones.
fn runs(seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in seqs {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == s => *b = s,
            _ => out.push((s, s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_only_splits_a_batch_into_the_high_runs_and_the_rest() {
        assert_eq!(runs(&[3, 4, 5, 9, 11, 12]), vec![(3, 5), (9, 9), (11, 12)]);
        assert_eq!(
            subtract(&[(1, 10), (20, 22)], &[1, 4, 5, 10, 21]),
            vec![(2, 3), (6, 9), (20, 20), (22, 22)]
        );
        assert_eq!(subtract(&[(1, 3)], &[]), vec![(1, 3)]);
    }
}
