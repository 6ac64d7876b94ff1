//! Time until the WAL is full (DESIGN §6b, `gateway_wal_full_in_seconds`):
//! the one place it is computed. `/readyz`, the fleet state and the metric
//! all read [`WalGrowth::full_in`].
//!
//! A sampler ([`crate::wal::WeakWalWriter::sample_growth`], started with
//! the running gateway) reads
//! the WAL's size and free disk every [`SAMPLE_EVERY`]. The net growth is
//! the change of the WAL's live bytes over the samples of the last
//! [`WINDOW`] (growth from ingest less what compaction removed), and
//! the time until full is the nearer of the two limits at that rate:
//! `wal.max_bytes` less the live bytes, and the free disk less
//! `wal.min_free_disk_bytes` (the WAL's growth is taken as the disk's: other
//! writers to the same disk are not seen). While the WAL shrinks or holds
//! still there is no value: the series is absent and `/readyz` says `null`.
//!
//! Lost on restart: the samples (the value is back one sample after start).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use prometheus::IntGaugeVec;

/// Time between two samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Growth is measured over the samples this recent.
pub const WINDOW: Duration = Duration::from_secs(300);

/// One reading of the WAL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When.
    pub at: Instant,
    /// The bytes counted against `wal.max_bytes`.
    pub live_bytes: u64,
    /// Free bytes on the WAL's file system.
    pub disk_free: u64,
    /// `wal.max_bytes`.
    pub max_bytes: u64,
    /// `wal.min_free_disk_bytes`.
    pub min_free_disk: u64,
}

/// Which limit comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `wal.max_bytes`.
    MaxBytes,
    /// `wal.min_free_disk_bytes` on the WAL's disk.
    DiskFree,
}

impl Limit {
    /// Its name in the metric's `limit` label and in `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxBytes => "max_bytes",
            Limit::DiskFree => "disk_free",
        }
    }
}

/// The time until full, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FullIn {
    /// Seconds until the nearer limit at the current net growth.
    pub seconds: u64,
    /// The nearer limit.
    pub limit: Limit,
    /// Net growth, bytes per second.
    pub growth_bytes_per_s: f64,
}

impl FullIn {
    /// As in `/readyz` details and the fleet state.
    pub fn to_json(self) -> Value {
        json!({
            "seconds": self.seconds,
            "limit": self.limit.as_str(),
            "growth_bytes_per_s": (self.growth_bytes_per_s * 10.0).round() / 10.0,
        })
    }
}

/// The recent samples (shared through [`crate::metrics::Metrics`]).
#[derive(Debug, Default)]
pub struct WalGrowth(Mutex<VecDeque<Sample>>);

impl WalGrowth {
    /// Adds a sample, forgets those older than [`WINDOW`], and moves the
    /// metric `gauge` (`gateway_wal_full_in_seconds`).
    pub fn observe(&self, s: Sample, gauge: &IntGaugeVec) {
        let full_in = {
            let Ok(mut q) = self.0.lock() else { return };
            while q
                .front()
                .is_some_and(|f| s.at.duration_since(f.at) > WINDOW)
            {
                q.pop_front();
            }
            q.push_back(s);
            estimate(q.front().copied(), s)
        };
        let g = gauge;
        for l in [Limit::MaxBytes, Limit::DiskFree] {
            if full_in.map(|f| f.limit) != Some(l) {
                let _ = g.remove_label_values(&[l.as_str()]);
            }
        }
        if let Some(f) = full_in {
            g.with_label_values(&[f.limit.as_str()])
                .set(f.seconds.min(i64::MAX as u64) as i64);
        }
    }

    /// The time until full now; `None` while the WAL does not grow (or
    /// before two samples).
    pub fn full_in(&self) -> Option<FullIn> {
        let q = self.0.lock().ok()?;
        estimate(q.front().copied(), *q.back()?)
    }
}

/// The time until full from the oldest sample of the window to the newest.
fn estimate(first: Option<Sample>, last: Sample) -> Option<FullIn> {
    let first = first?;
    let secs = last.at.checked_duration_since(first.at)?.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let growth = (last.live_bytes as f64 - first.live_bytes as f64) / secs;
    if growth <= 0.0 {
        return None;
    }
    let to_max = last.max_bytes.saturating_sub(last.live_bytes) as f64 / growth;
    let to_disk = last.disk_free.saturating_sub(last.min_free_disk) as f64 / growth;
    let (t, limit) = if to_disk < to_max {
        (to_disk, Limit::DiskFree)
    } else {
        (to_max, Limit::MaxBytes)
    };
    Some(FullIn {
        seconds: t as u64,
        limit,
        growth_bytes_per_s: growth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn sample(at: Instant, live: u64, free: u64) -> Sample {
        Sample {
            at,
            live_bytes: live,
            disk_free: free,
            max_bytes: 1_000_000,
            min_free_disk: 100_000,
        }
    }

    #[test]
    fn full_in_is_the_nearer_limit_at_the_net_growth_and_absent_while_shrinking() {
        let m = Metrics::unregistered();
        let g = WalGrowth::default();
        let t0 = Instant::now();
        g.observe(sample(t0, 100_000, 10_000_000), &m.wal_full_in_seconds);
        assert_eq!(g.full_in(), None, "one sample says nothing");
        // 1000 B/s: 900 s to max_bytes, far more to the disk.
        g.observe(
            sample(t0 + Duration::from_secs(10), 110_000, 9_990_000),
            &m.wal_full_in_seconds,
        );
        let f = g.full_in().unwrap();
        assert_eq!((f.seconds, f.limit), (890, Limit::MaxBytes));
        assert_eq!(
            m.wal_full_in_seconds
                .with_label_values(&["max_bytes"])
                .get(),
            890
        );
        // A small disk comes first.
        g.observe(
            sample(t0 + Duration::from_secs(20), 120_000, 200_000),
            &m.wal_full_in_seconds,
        );
        let f = g.full_in().unwrap();
        assert_eq!((f.seconds, f.limit), (100, Limit::DiskFree));
        // Shrinking over the window: no value, no series.
        g.observe(
            sample(t0 + Duration::from_secs(30), 50_000, 200_000),
            &m.wal_full_in_seconds,
        );
        assert_eq!(g.full_in(), None);
        use prometheus::core::Collector;
        let series: usize = m
            .wal_full_in_seconds
            .collect()
            .iter()
            .map(|f| f.get_metric().len())
            .sum();
        assert_eq!(series, 0);
        // Samples older than the window are forgotten.
        let later = t0 + WINDOW + Duration::from_secs(40);
        g.observe(sample(later, 60_000, 200_000), &m.wal_full_in_seconds);
        g.observe(
            sample(later + Duration::from_secs(10), 70_000, 200_000),
            &m.wal_full_in_seconds,
        );
        let f = g.full_in().unwrap();
        assert_eq!((f.seconds, f.growth_bytes_per_s), (100, 1000.0));
    }
}
