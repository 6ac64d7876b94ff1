//! The `[wal]` section: the write-ahead log's limits and timings
//! ([`WalKeys`] → [`WalSettings`]). Defaults: `config/default.toml`.

use std::time::Duration;

use gateway_actors::keys::{duration_at_most, duration_key, KeyError};
use gateway_actors::wal::BackpressurePolicy;
use serde::Deserialize;

/// The longest `wal.ack_flush`: what a crash may deliver again stays small.
pub const MAX_ACK_FLUSH: Duration = Duration::from_secs(10);
/// The longest `wal.commit_window`: a device's acknowledgement waits for it.
pub const MAX_COMMIT_WINDOW: Duration = Duration::from_secs(1);

/// The `[wal]` keys, as merged from every layer (defaults included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalKeys {
    /// Backpressure above this much live data, at least 1048576 (1 MiB).
    pub max_bytes: u64,
    /// Backpressure below this much free disk.
    pub min_free_disk_bytes: u64,
    /// Delivered records stay this long for replay.
    pub retention: String,
    /// A repeated idempotency key inside this window is a duplicate.
    pub dedup_window: String,
    /// What backpressure does: `block` (refuse new records) or
    /// `drop_oldest`.
    pub policy: String,
    /// Sink acks wait in memory at most this long, then go to disk together
    /// (0s: each at once; at most 10s): a crash delivers at most this long
    /// of records again.
    pub ack_flush: String,
    /// While appends come faster than this, one waits up to this long (or
    /// until 28 records) for others to share its commit (0s: never; at most
    /// 1s): ack latency for disk wear.
    pub commit_window: String,
}

/// WAL settings.
#[derive(Debug, Clone)]
pub struct WalSettings {
    /// Backpressure above this.
    pub max_bytes: u64,
    /// Backpressure below this much free disk.
    pub min_free_disk_bytes: u64,
    /// Delivered records kept this long.
    pub retention: Duration,
    /// Dedup window.
    pub dedup_window: Duration,
    /// What backpressure does.
    pub policy: BackpressurePolicy,
    /// Sink acknowledgements wait in memory at most this long before they
    /// are stored (`WalConfig::ack_flush`).
    pub ack_flush: Duration,
    /// The first append of a commit waits this long for others to share it
    /// (`WalConfig::commit_window`).
    pub commit_window: Duration,
}

impl WalKeys {
    /// Validates the keys.
    pub fn build(&self) -> Result<WalSettings, KeyError> {
        let retention = duration_key("retention", &self.retention)?;
        let dedup_window = duration_key("dedup_window", &self.dedup_window)?;
        let ack_flush = duration_at_most(
            "ack_flush",
            &self.ack_flush,
            MAX_ACK_FLUSH,
            "a crash delivers this long of acknowledged records again",
        )?;
        let commit_window = duration_at_most(
            "commit_window",
            &self.commit_window,
            MAX_COMMIT_WINDOW,
            "every acknowledgement waits up to this long",
        )?;
        let policy = match self.policy.as_str() {
            "block" => BackpressurePolicy::Block,
            "drop_oldest" => BackpressurePolicy::DropOldest,
            other => {
                return Err(KeyError::new(
                    "policy",
                    format!("{other:?}: expected block or drop_oldest"),
                ))
            }
        };
        if self.max_bytes < 1 << 20 {
            return Err(KeyError::new(
                "max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        Ok(WalSettings {
            max_bytes: self.max_bytes,
            min_free_disk_bytes: self.min_free_disk_bytes,
            retention,
            dedup_window,
            policy,
            ack_flush,
            commit_window,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;
    use std::time::Duration;

    #[test]
    fn the_wal_holds_acks_a_second_and_groups_commits_within_bounds() {
        let s = Settings::from_toml("").unwrap();
        let w = s.wal_config();
        assert_eq!(w.ack_flush, Duration::from_secs(1));
        assert_eq!(w.commit_window, Duration::from_millis(30));
        let s =
            Settings::from_toml("[wal]\nack_flush = \"0s\"\ncommit_window = \"200ms\"\n").unwrap();
        assert_eq!(s.wal.ack_flush, Duration::ZERO);
        assert_eq!(s.wal.commit_window, Duration::from_millis(200));
        for (key, bad) in [
            ("ack_flush", "11s"),
            ("commit_window", "2s"),
            ("commit_window", "soon"),
        ] {
            let e = Settings::from_toml(&format!("[wal]\n{key} = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("wal.{key}")), "{key} = {bad}: {e}");
        }
    }
}
