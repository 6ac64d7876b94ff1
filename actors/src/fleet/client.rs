//! `FleetClient`: the gateway's connection to the fleet broker.
//!
//! Role: its own MQTT client (clean session: a command sent while the
//! gateway was away is not run later; it would be refused as expired
//! anyway) subscribed at QoS 1 to `fleet/{gateway_id}/control/+` and
//! `fleet/group/{group}/control/+` for each group. Every message is checked
//! ([`Commands::handle`]: signature, window, target, replay) and then run
//! through the shared [`Operator`], like a local control-plane command;
//! the reply goes to `fleet/{gateway_id}/reply/{request_id}` and, on MQTT 5,
//! to the request's response topic with its correlation data. It also
//! publishes the retained state (`fleet/{gateway_id}/state`) on connect, on
//! change (at most every 5 s) and every `state_interval`; its last will
//! publishes `{"online": false}` there.
//!
//! Isolation: the client runs on its own task and publishes only while
//! connected; an unreachable or stalled fleet broker costs reconnect
//! attempts with backoff and nothing else (ingest and sinks never wait for
//! it).
//!
//! Handles [`ReloadTls`]. Sends operator commands through [`Operator`].
//!
//! Restart policy: supervised. Connection failures reconnect with backoff;
//! if the loop ends, the actor stops and the supervisor starts a new
//! client. Lost on restart: nothing durable (the accepted request ids are
//! in `fleet.db`); commands being executed keep running, their replies are
//! dropped with the old client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::apply::Bundles;
use super::bundle::Refusal as BundleRefusal;
use super::config::FleetConfig;
use super::seen::SeenIds;
use super::state::{offline, StateSource};
use super::verify::{self, Refusal, Refused, TrustedKeys, WINDOW};
use crate::control::plane::{reply, valid_request_id};
use crate::control::{Command, Operator};
use crate::metrics::Metrics;
use crate::mqtt::client::{ClientOptions, Event, MqttClient, PublishExtras};
use crate::mqtt::ReloadTls;
use crate::repeats::{self, Kind};

/// The state is published at most this often on change.
pub const MIN_STATE_GAP: Duration = Duration::from_secs(5);

/// The fleet client actor.
pub struct FleetClient {
    cfg: FleetConfig,
    commands: Arc<Commands>,
    metrics: Metrics,
    running: Option<SpawnHandle>,
}

impl FleetClient {
    /// A client for `cfg` running commands through `operator`; `seen` holds
    /// the accepted request ids (opened by the caller, so that start-up
    /// fails on a data dir it cannot write).
    /// `bundles`: config bundles (`bundle.apply` is refused without them).
    pub fn new(
        cfg: FleetConfig,
        operator: Arc<Operator>,
        seen: SeenIds,
        bundles: Option<Arc<Bundles>>,
        metrics: Metrics,
    ) -> Self {
        for r in Refusal::ALL {
            metrics.fleet_commands.with_label_values(&[r.as_str()]);
        }
        let commands = Arc::new(Commands {
            gateway_id: cfg.gateway_id.clone(),
            groups: cfg.groups.clone(),
            trusted: cfg.trusted.clone(),
            seen: Mutex::new(seen),
            operator,
            bundles,
            metrics: metrics.clone(),
        });
        Self {
            cfg,
            commands,
            metrics,
            running: None,
        }
    }
}

impl Actor for FleetClient {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let running = run(self.cfg.clone(), self.commands.clone(), self.metrics.clone())
            .into_actor(self)
            .map(|res: Result<(), String>, act, ctx| {
                act.metrics.fleet_connected.set(0);
                tracing::error!(error = %res.err().unwrap_or_default(), "fleet client loop ended; restarting it");
                ctx.stop();
            });
        self.running = Some(ctx.spawn(running));
    }
}

impl Supervised for FleetClient {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.metrics
            .actor_restarts
            .with_label_values(&["FleetClient"])
            .inc();
        tracing::warn!(actor = "FleetClient", "restarting");
    }
}

impl Handler<ReloadTls> for FleetClient {
    type Result = Result<bool, String>;

    /// Reads the TLS files again and reconnects with them (see [`ReloadTls`]).
    fn handle(&mut self, _: ReloadTls, ctx: &mut Context<Self>) -> Self::Result {
        if !crate::mqtt::stop_for_new_tls(&mut self.cfg.conn, &mut self.running, ctx)? {
            return Ok(false);
        }
        tracing::info!("fleet client TLS files reloaded; reconnecting with them");
        self.started(ctx);
        Ok(true)
    }
}

/// Connects, serves commands and publishes the state until the client task ends.
async fn run(cfg: FleetConfig, commands: Arc<Commands>, metrics: Metrics) -> Result<(), String> {
    let topic = cfg.state_topic();
    let mut opts = ClientOptions::new(cfg.conn.clone());
    opts.subscribe = cfg.filters();
    let will = serde_json::to_vec(&offline(&cfg.gateway_id, &cfg.groups)).unwrap_or_default();
    opts.last_will = Some((topic.clone(), Bytes::from(will)));
    let (client, mut events) = MqttClient::connect(&opts)?;
    let connected = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let states = actix_rt::spawn(publish_states(
        client.clone(),
        commands.operator.clone(),
        StateSource::new(&cfg.gateway_id, &cfg.groups, cfg.wal_limit, metrics.clone())
            .with_bundles(commands.bundles.clone()),
        topic,
        cfg.state_interval,
        connected.clone(),
        wake.clone(),
    ));
    while let Some(event) = events.recv().await {
        match event {
            Event::Connected { .. } => {
                connected.store(true, Ordering::SeqCst);
                metrics.fleet_connected.set(1);
                wake.notify_one();
                tracing::info!(host = %cfg.conn.host, port = cfg.conn.port, "fleet broker connected");
            }
            Event::Subscribed => tracing::debug!("fleet commands subscribed"),
            Event::Message(request) => {
                let (commands, client) = (commands.clone(), client.clone());
                actix_rt::spawn(async move {
                    let (topic, body) = commands.handle(&request.topic, &request.payload).await;
                    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                    reply(&client, &request, topic, bytes).await;
                });
            }
            Event::Disconnected {
                error,
                failures,
                retry_in,
            } => {
                connected.store(false, Ordering::SeqCst);
                metrics.fleet_connected.set(0);
                if repeats::admit(Kind::MqttReconnect, "fleet") {
                    tracing::warn!(error = %error, failures, retry_in_ms = retry_in.as_millis() as u64, "fleet broker disconnected; reconnecting");
                }
            }
            _ => {}
        }
    }
    states.abort();
    Err("fleet event loop ended".to_string())
}

/// Publishes the retained state: right after each connect and each change
/// of the bundle's status, then on change (checked every [`MIN_STATE_GAP`]) and at least every `interval`; never
/// while disconnected (nothing queues up behind a dead link).
async fn publish_states(
    client: MqttClient,
    operator: Arc<Operator>,
    mut source: StateSource,
    topic: String,
    interval: Duration,
    connected: Arc<AtomicBool>,
    wake: Arc<Notify>,
) {
    let mut last: Option<(Instant, String)> = None;
    loop {
        tokio::select! {
            _ = actix_rt::time::sleep(MIN_STATE_GAP) => {}
            _ = wake.notified() => last = None,
            // A bundle's status is what a rollout waits for: published at
            // once (it changes a few times per bundle, never in a flap).
            _ = source.bundle_changed() => last = None,
        }
        if !connected.load(Ordering::SeqCst) {
            continue;
        }
        let report = match source.report(&operator).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "fleet state not available");
                continue;
            }
        };
        let due = last.as_ref().is_none_or(|(at, significant)| {
            *significant != report.significant || at.elapsed() >= interval
        });
        if !due {
            continue;
        }
        let body = Bytes::from(serde_json::to_vec(&report.body).unwrap_or_default());
        let extras = PublishExtras {
            retain: true,
            ..PublishExtras::default()
        };
        match client.publish(topic.clone(), body, extras).await {
            Ok(()) => last = Some((Instant::now(), report.significant)),
            Err(e) => tracing::warn!(error = %e, "cannot publish the fleet state"),
        }
    }
}

/// Checks fleet commands and runs the accepted ones.
pub struct Commands {
    gateway_id: String,
    groups: Vec<String>,
    trusted: TrustedKeys,
    seen: Mutex<SeenIds>,
    operator: Arc<Operator>,
    bundles: Option<Arc<Bundles>>,
    metrics: Metrics,
}

impl Commands {
    /// The target (`gateway_id` or `group/NAME`) and command a topic names,
    /// if it is one of ours.
    fn addressed<'t>(&self, topic: &'t str) -> Option<(String, &'t str)> {
        let rest = topic.strip_prefix("fleet/")?;
        if let Some(rest) = rest.strip_prefix("group/") {
            let (group, command) = rest.split_once("/control/")?;
            return self
                .groups
                .iter()
                .any(|g| g == group)
                .then(|| (format!("group/{group}"), command));
        }
        let (id, command) = rest.split_once("/control/")?;
        (id == self.gateway_id).then(|| (id.to_string(), command))
    }

    /// Runs one fleet message: the reply topic and body. A refused message
    /// is answered `{"request_id","ok":false,"error":REASON,"message"}`,
    /// counted and audit-logged; an accepted one runs through the
    /// [`Operator`] (which audit-logs it with actor `fleet:KEY_ID`).
    pub async fn handle(&self, topic: &str, payload: &[u8]) -> (String, Value) {
        let now = crate::wal::now_ms();
        let envelope = match self.addressed(topic) {
            None => Err(Refused {
                request_id: None,
                reason: Refusal::WrongTarget,
                message: format!("{topic:?} is not a command topic of this gateway"),
            }),
            Some((target, command)) => verify::check(payload, &self.trusted, now)
                .and_then(|env| self.admit(env, &target, command, now)),
        };
        let env = match envelope {
            Ok(env) => env,
            Err(r) => return self.refused(r),
        };
        let reply_topic = self.reply_topic(Some(&env.request_id));
        let rid = env.request_id.clone();
        let actor = format!("fleet:{}", env.key_id);
        if env.command == "bundle.apply" {
            return (reply_topic, self.apply_bundle(env, &actor).await);
        }
        let result = match Command::parse(&env.command, env.args) {
            Err(e) => {
                tracing::warn!(target: "audit", actor = %actor, command = %env.command, outcome = "error", error = %e, "operator command");
                Err(e)
            }
            Ok(cmd) => self.operator.execute(cmd, &actor).await,
        };
        let (outcome, body) = match result {
            Ok(v) => ("ok", json!({"request_id": rid, "ok": true, "result": v})),
            Err(e) => (
                "error",
                json!({"request_id": rid, "ok": false, "error": e.code(), "message": e.to_string()}),
            ),
        };
        self.metrics
            .fleet_commands
            .with_label_values(&[outcome])
            .inc();
        (reply_topic, body)
    }

    /// Runs an accepted `bundle.apply`: the reply body (audit-logged and
    /// counted like the other commands).
    async fn apply_bundle(&self, env: verify::Envelope, actor: &str) -> Value {
        let rid = env.request_id;
        let result = match &self.bundles {
            None => Err(BundleRefusal::Invalid(
                "config bundles need the gateway binary (`gateway run`)".into(),
            )),
            Some(b) => b.apply(&self.operator, env.args, &rid).await,
        };
        let (outcome, body) = match result {
            Ok(v) => {
                tracing::info!(target: "audit", actor = %actor, command = "bundle.apply", outcome = "ok", result = %v, "operator command");
                ("ok", json!({"request_id": rid, "ok": true, "result": v}))
            }
            Err(e) => {
                tracing::warn!(target: "audit", actor = %actor, command = "bundle.apply", outcome = "error", error = %e, "operator command");
                (
                    "error",
                    json!({"request_id": rid, "ok": false, "error": e.code(), "message": e.message()}),
                )
            }
        };
        self.metrics
            .fleet_commands
            .with_label_values(&[outcome])
            .inc();
        body
    }

    /// A verified envelope is for this topic's target and command, and its
    /// request id is new (recorded now, on disk, before it runs).
    fn admit(
        &self,
        env: verify::Envelope,
        target: &str,
        command: &str,
        now: i64,
    ) -> Result<verify::Envelope, Refused> {
        let refuse = |reason, message: String| Refused {
            request_id: Some(env.request_id.clone()),
            reason,
            message,
        };
        if !valid_request_id(&env.request_id) {
            return Err(refuse(
                Refusal::BadRequest,
                "\"request_id\" must be 1 to 128 characters without '/', '+' or '#'".into(),
            ));
        }
        if env.target != target || env.command != command {
            return Err(refuse(
                Refusal::WrongTarget,
                format!(
                    "signed for {:?} command {:?}, received for {target:?} command {command:?}",
                    env.target, env.command
                ),
            ));
        }
        let expires = env.issued_at + WINDOW.as_millis() as i64;
        let fresh = self
            .seen
            .lock()
            .map_err(|_| "lock poisoned".to_string())
            .and_then(|s| s.admit(&env.request_id, expires, now));
        match fresh {
            Ok(true) => Ok(env),
            Ok(false) => Err(refuse(
                Refusal::Replayed,
                format!("request {:?} was already accepted", env.request_id),
            )),
            // Without the record a replay could pass: refuse rather than run.
            Err(e) => Err(refuse(
                Refusal::BadRequest,
                format!("cannot record the request id: {e}"),
            )),
        }
    }

    fn reply_topic(&self, request_id: Option<&str>) -> String {
        let rid = request_id
            .filter(|r| valid_request_id(r))
            .unwrap_or("invalid");
        format!("fleet/{}/reply/{rid}", self.gateway_id)
    }

    fn refused(&self, r: Refused) -> (String, Value) {
        let reason = r.reason.as_str();
        tracing::warn!(target: "audit", actor = "fleet", request_id = ?r.request_id, outcome = "refused", reason, error = %r.message, "fleet command refused");
        self.metrics
            .fleet_commands
            .with_label_values(&[reason])
            .inc();
        (
            self.reply_topic(r.request_id.as_deref()),
            json!({"request_id": r.request_id, "ok": false, "error": reason, "message": r.message}),
        )
    }
}
