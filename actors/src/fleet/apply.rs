//! `Bundles`: applies config bundles and runs their probation ([`super::bundle`]
//! describes the bundle, its files and its life).
//!
//! Applying restarts the whole process (the gateway stops as on SIGTERM,
//! storing the acknowledgements it holds, and re-executes itself): simple,
//! and every part the bundle touches (a sink, a listener, a route) starts
//! from the merged configuration exactly as at boot. Parts it does not touch
//! restart too; the ingest pause is the time of a start (under a second).
//!
//! The probation watches, every 500 ms for `fleet.probation`:
//! - readiness (the `/readyz` checks, given as a hook by the HTTP layer);
//! - the fleet broker connection (`gateway_fleet_connected`);
//! - every sink that was up when the bundle was applied (still configured).
//!
//! It fails as soon as one of them has been failing for longer than half
//! the probation, or when one is failing at its end; it then records
//! `rolled_back` with the reason and re-executes on the active bundle.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::bundle::{check_apply, Bundle, BundleStore, Refusal, StoreState};
use crate::control::ops::sink_row_up;
use crate::control::Operator;
use crate::metrics::Metrics;

/// Validates the merged configuration with a bundle's version and settings as its layer.
pub type Validate = Arc<dyn Fn(u64, &Value) -> Result<(), String> + Send + Sync>;
/// Stops the gateway cleanly and re-executes it; the argument says why.
pub type Restart = Arc<dyn Fn(&str) + Send + Sync>;
/// `Ok` while the gateway is ready (`/readyz`), else what fails.
pub type Ready = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// How often the probation looks.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// The reply leaves before the restart.
const RESTART_DELAY: Duration = Duration::from_millis(300);

/// The bundles of a running gateway.
pub struct Bundles {
    store: BundleStore,
    state: Mutex<StoreState>,
    validate: Validate,
    restart: Restart,
    probation: Duration,
    metrics: Metrics,
    /// One apply at a time (the check and the stage are one step).
    applying: tokio::sync::Mutex<()>,
    /// Woken on every status change: the state is published right away.
    changed: tokio::sync::Notify,
}

impl Bundles {
    /// `state` is what [`BundleStore::boot`] decided.
    pub fn new(
        store: BundleStore,
        state: StoreState,
        validate: Validate,
        restart: Restart,
        probation: Duration,
        metrics: Metrics,
    ) -> Self {
        let b = Self {
            store,
            state: Mutex::new(StoreState::default()),
            validate,
            restart,
            probation,
            metrics,
            applying: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
        };
        b.set_state(state);
        b
    }

    fn set_state(&self, s: StoreState) {
        self.metrics.fleet_bundle.reset();
        let version = s
            .version
            .map_or_else(|| "none".to_string(), |v| v.to_string());
        self.metrics
            .fleet_bundle
            .with_label_values(&[&version, s.status.as_str()])
            .set(1);
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
        self.changed.notify_one();
    }

    /// Returns at the next status change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The state document's `bundle` field.
    pub fn report(&self) -> Value {
        self.state
            .lock()
            .map(|s| s.report())
            .unwrap_or_else(|_| json!({"version": null, "status": "none"}))
    }

    /// Runs `bundle.apply`: checks, validates, stages, replies, then
    /// restarts the gateway with it. Nothing is touched when it is refused.
    pub async fn apply(
        &self,
        operator: &Operator,
        args: Value,
        request_id: &str,
    ) -> Result<Value, Refusal> {
        let _one = self.applying.lock().await;
        let state = self.store.state().map_err(Refusal::Storage)?;
        let (version, settings) = check_apply(&args, &state)?;
        (self.validate)(version, &settings).map_err(Refusal::Invalid)?;
        let sinks_up = match operator.sinks_report().await {
            Ok((_, sinks)) => sinks
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| sink_row_up(s))
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect(),
            Err(e) => return Err(Refusal::Storage(format!("cannot read the sinks: {e}"))),
        };
        let bundle = Bundle {
            version,
            settings,
            sinks_up,
            applied_at_ms: crate::wal::now_ms(),
            request_id: request_id.to_string(),
        };
        let staged = self.store.stage(&bundle).map_err(Refusal::Storage)?;
        self.set_state(staged);
        tracing::info!(version, sinks_up = ?bundle.sinks_up, "config bundle accepted; restarting with it");
        let restart = self.restart.clone();
        actix_rt::spawn(async move {
            actix_rt::time::sleep(RESTART_DELAY).await;
            restart("bundle.apply");
        });
        Ok(json!({
            "version": version,
            "status": "applying",
            "probation_s": self.probation.as_secs(),
        }))
    }

    /// Watches the bundle on probation for `fleet.probation`, then keeps it
    /// or rolls it back (and restarts).
    pub async fn run_probation(
        self: Arc<Self>,
        bundle: Bundle,
        operator: Arc<Operator>,
        ready: Ready,
    ) {
        let half = self.probation / 2;
        let started = Instant::now();
        tracing::info!(
            version = bundle.version,
            probation_s = self.probation.as_secs(),
            "config bundle on probation"
        );
        let mut failing_since: BTreeMap<String, (Instant, String)> = BTreeMap::new();
        let verdict = loop {
            actix_rt::time::sleep(PROBE_EVERY).await;
            let now = Instant::now();
            let failing = self.failing_checks(&bundle, &operator, &ready).await;
            failing_since.retain(|k, _| failing.contains_key(k));
            for (k, why) in failing {
                failing_since
                    .entry(k)
                    .and_modify(|e| e.1 = why.clone())
                    .or_insert((now, why));
            }
            if let Some((k, (_, why))) = failing_since
                .iter()
                .find(|(_, (since, _))| now.duration_since(*since) > half)
            {
                break Err(format!(
                    "{k} failing for more than {}s: {why}",
                    half.as_secs_f32()
                ));
            }
            if started.elapsed() >= self.probation {
                break match failing_since.iter().next() {
                    Some((k, (_, why))) => {
                        Err(format!("{k} failing at the end of probation: {why}"))
                    }
                    None => Ok(()),
                };
            }
        };
        match verdict {
            Ok(()) => match self.store.promote() {
                Ok(s) => {
                    tracing::info!(
                        version = bundle.version,
                        "config bundle passed its probation; it is active"
                    );
                    self.set_state(s);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the bundle as active; rolling back");
                    self.roll_back(&format!("cannot record it as active: {e}"));
                }
            },
            Err(reason) => self.roll_back(&reason),
        }
    }

    /// What fails now: check name → why.
    async fn failing_checks(
        &self,
        bundle: &Bundle,
        operator: &Operator,
        ready: &Ready,
    ) -> BTreeMap<String, String> {
        let mut failing = BTreeMap::new();
        if let Err(why) = ready() {
            failing.insert("readiness".to_string(), why);
        }
        if self.metrics.fleet_connected.get() != 1 {
            failing.insert(
                "fleet".to_string(),
                "not connected to the fleet broker".to_string(),
            );
        }
        match operator.sinks_report().await {
            Ok((_, sinks)) => {
                for s in sinks.as_array().into_iter().flatten() {
                    let name = s["name"].as_str().unwrap_or_default();
                    if bundle.sinks_up.iter().any(|n| n == name) && !sink_row_up(s) {
                        let why = s["last_error"]
                            .as_str()
                            .map(|e| crate::secret::redact(e, 100))
                            .unwrap_or_else(|| "down".into());
                        failing.insert(format!("sink {name}"), why);
                    }
                }
            }
            Err(e) => {
                failing.insert("sinks".to_string(), e.to_string());
            }
        }
        failing
    }

    /// Records the rollback, then restarts on the active bundle.
    fn roll_back(&self, reason: &str) {
        tracing::error!(reason, "config bundle failed its probation; rolling back");
        match self.store.roll_back(reason) {
            Ok(s) => self.set_state(s),
            // The state still says probation: the next start rolls back.
            Err(e) => tracing::error!(error = %e, "cannot record the rollback"),
        }
        (self.restart)("rollback");
    }
}
