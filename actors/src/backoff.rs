//! [`Backoff`]: the one retry policy with jitter, shared by every MQTT
//! connection's reconnects and every sink's retries (and its circuit's
//! probe), so that a fleet of gateways never retries in lockstep and none
//! of them spins.

use std::time::Duration;

/// Exponential from `base`, capped at `max`, with "equal jitter": a delay
/// is drawn from the upper half of its step, so it is never less than half
/// the step (no spin) and many gateways or clients do not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failed attempts in a row (1 = the first);
    /// at least 1 ms.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let d = exp.min(self.max).max(Duration::from_millis(1));
        let half = d / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        for failures in 1..40 {
            let cap = (Duration::from_millis(100) * (1 << (failures - 1).min(16))).min(b.max);
            let d = b.delay(failures);
            assert!(
                d >= cap / 2 && d <= cap,
                "{failures}: {d:?} outside {cap:?}/2..={cap:?}"
            );
        }
        let draws: std::collections::HashSet<_> = (0..20).map(|_| b.delay(5)).collect();
        assert!(draws.len() > 1, "no jitter");
    }
}
