//! The `[log]` section: its keys ([`LogKeys`]) and what they build
//! ([`LogSettings`]). Defaults: `config/default.toml`.

use std::time::Duration;

use gateway_actors::keys::{duration_key, KeyError};
use serde::Deserialize;

/// The `[log]` keys, as merged from every layer (defaults included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogKeys {
    /// `trace` | `debug` | `info` | `warn` | `error`, or an EnvFilter
    /// directive that ends in one (`info,gateway_actors::dispatcher=debug`).
    pub level: String,
    /// A repeated event (one device's rejections for one reason, a sink's
    /// failures, reconnects) is logged in full this many times per
    /// `repeat_interval`, then summed up in one line; at least 1.
    pub repeat_burst: u32,
    /// The interval of `repeat_burst`, at least 1s.
    pub repeat_interval: String,
}

/// The validated `[log]` section.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// tracing EnvFilter directive.
    pub level: String,
    /// Rate limit of repeated log events.
    pub repeats: LogRepeats,
}

/// How often a repeated event (a device's rejections for one reason, a
/// sink's failures, reconnects) is logged in full: `burst` lines per key and
/// `interval`, then one summary line (`gateway_actors::repeats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRepeats {
    /// Full lines per key and interval.
    pub burst: u32,
    /// The interval.
    pub interval: Duration,
}

impl LogKeys {
    /// Validates the keys.
    pub fn build(&self) -> Result<LogSettings, KeyError> {
        crate::telemetry::check_level(&self.level).map_err(|why| KeyError::new("level", why))?;
        if self.repeat_burst == 0 {
            return Err(KeyError::new("repeat_burst", "must be at least 1"));
        }
        let interval = duration_key("repeat_interval", &self.repeat_interval)?;
        if interval < Duration::from_secs(1) {
            return Err(KeyError::new("repeat_interval", "must be at least 1s"));
        }
        Ok(LogSettings {
            level: self.level.clone(),
            repeats: LogRepeats {
                burst: self.repeat_burst,
                interval,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn log_level_directives_must_end_in_a_level() {
        for ok in ["debug", "info,gateway_actors::dispatcher=debug", "WARN"] {
            assert!(
                Settings::from_toml(&format!("[log]\nlevel = \"{ok}\"\n")).is_ok(),
                "{ok}"
            );
        }
        // EnvFilter alone would take "debgu" as a target and log nothing.
        let e = Settings::from_toml("[log]\nlevel = \"debgu\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.level") && e.contains("debgu"), "{e}");
    }

    #[test]
    fn log_repeat_limits_default_to_five_a_minute_and_are_checked() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(
            s.log_repeats,
            LogRepeats {
                burst: 5,
                interval: Duration::from_secs(60)
            }
        );
        let s =
            Settings::from_toml("[log]\nrepeat_burst = 2\nrepeat_interval = \"10s\"\n").unwrap();
        assert_eq!(
            (s.log_repeats.burst, s.log_repeats.interval.as_secs()),
            (2, 10)
        );
        for (bad, key) in [
            ("repeat_burst = 0", "log.repeat_burst"),
            ("repeat_interval = \"500ms\"", "log.repeat_interval"),
            ("repeat_interval = \"often\"", "log.repeat_interval"),
        ] {
            let e = Settings::from_toml(&format!("[log]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }
}
