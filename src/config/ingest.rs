//! The `[ingest]` section: the limits every device's data must keep
//! ([`IngestKeys`] → [`IngestSettings`]). Defaults: `config/default.toml`.

use gateway_actors::ingest::{IngestLimits, RateLimit};
use gateway_actors::keys::KeyError;
use serde::Deserialize;

/// The `[ingest]` keys, as merged from every layer (defaults included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestKeys {
    /// Largest request body or MQTT message, 64 to 16777216 bytes.
    pub max_payload_bytes: usize,
    /// Most records in one JSON array, 1 to 100000.
    pub max_batch_records: usize,
    /// Records per second per device, >= 0; 0 = unlimited.
    pub rate_limit_per_device: f64,
    /// The rate limit's bucket size, >= 0; 0 = twice the rate (at least 1).
    pub rate_limit_burst: f64,
}

/// Ingest settings.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Size limits.
    pub limits: IngestLimits,
    /// Per-device rate limit.
    pub rate: RateLimit,
}

impl IngestKeys {
    /// Validates the keys.
    pub fn build(&self) -> Result<IngestSettings, KeyError> {
        if !(64..=16 << 20).contains(&self.max_payload_bytes) {
            return Err(KeyError::new(
                "max_payload_bytes",
                "must be between 64 and 16777216",
            ));
        }
        if !(1..=100_000).contains(&self.max_batch_records) {
            return Err(KeyError::new(
                "max_batch_records",
                "must be between 1 and 100000",
            ));
        }
        let per_second = self.rate_limit_per_device;
        if !per_second.is_finite() || per_second < 0.0 {
            return Err(KeyError::new(
                "rate_limit_per_device",
                "must be >= 0 (0 = unlimited)",
            ));
        }
        let burst = self.rate_limit_burst;
        if !burst.is_finite() || burst < 0.0 {
            return Err(KeyError::new("rate_limit_burst", "must be >= 0"));
        }
        let rate = if per_second == 0.0 {
            RateLimit::OFF
        } else if burst == 0.0 {
            RateLimit {
                per_second,
                burst: (per_second * 2.0).max(1.0),
            }
        } else {
            RateLimit { per_second, burst }
        };
        Ok(IngestSettings {
            limits: IngestLimits {
                max_payload_bytes: self.max_payload_bytes,
                max_batch_records: self.max_batch_records,
            },
            rate,
        })
    }
}
