//! `ControlPlane`: operator commands over MQTT (DESIGN §4 I6).
//!
//! Role: its own MQTT client (client id `{mqtt client id}-control`, clean
//! session: a command sent while the gateway was down is not run hours
//! later) subscribed at QoS 1 to `gateway/{gateway_id}/control/+`. The last
//! topic level names the command; the payload is a JSON object
//! `{"request_id":"…", …args}`. The reply
//! `{"request_id":"…","ok":true,"result":…}` or
//! `{"request_id":"…","ok":false,"error":{"code":…,"message":…}}` goes to
//! `gateway/{gateway_id}/control/reply/{request_id}` and, on MQTT 5, also to
//! the request's response topic with its correlation data. A request without
//! a usable `request_id` is answered on `…/control/reply/invalid`. Commands
//! run through the shared [`Operator`], so they are counted and audit-logged
//! like admin API and CLI actions. The same client publishes `device.send`
//! messages.
//!
//! Handles [`ReloadTls`] (certificate rotation). Sends operator messages through
//! [`Operator`].
//!
//! Restart policy: supervised. Connection failures reconnect with backoff;
//! if the loop ends, the actor stops and the supervisor starts a new client.
//! Lost on restart: commands being executed keep running (their replies are
//! dropped if the client is gone).

use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use serde_json::{json, Value};

use super::ops::{Command, OpError, Operator};
use crate::metrics::Metrics;
use crate::mqtt::client::{Event, Message, MqttClient, PublishExtras};
use crate::mqtt::{MqttIngestConfig, ReloadTls};
use crate::repeats::{self, Kind};

/// The control plane actor.
pub struct ControlPlane {
    /// The ingest broker's connection settings with a `-control` client id:
    /// commands come over the site's broker, on a session of their own so
    /// that a flood of telemetry cannot hold them up.
    cfg: MqttIngestConfig,
    /// Names this gateway's command and reply topics.
    gateway_id: String,
    /// Runs each command, the same one the admin API and the CLI use, so
    /// a command does the same whichever way it came.
    operator: Arc<Operator>,
    /// Counts its own restarts under supervision.
    metrics: Metrics,
    /// The running session loop; a TLS reload cancels it and starts anew.
    running: Option<SpawnHandle>,
}

impl ControlPlane {
    /// A control plane on the broker of `cfg` (the ingest connection's
    /// settings; the client id gets a `-control` suffix).
    pub fn new(
        cfg: &MqttIngestConfig,
        gateway_id: &str,
        operator: Arc<Operator>,
        metrics: Metrics,
    ) -> Self {
        let mut cfg = cfg.clone();
        cfg.conn.client_id = format!("{}-control", cfg.conn.client_id);
        Self {
            cfg,
            gateway_id: gateway_id.to_string(),
            operator,
            metrics,
            running: None,
        }
    }
}

impl Actor for ControlPlane {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (cfg, id, op) = (
            self.cfg.clone(),
            self.gateway_id.clone(),
            self.operator.clone(),
        );
        let running = run(cfg, id, op).into_actor(self).map(|res: Result<(), String>, act, ctx| {
            act.operator.set_device_publisher(None);
            tracing::error!(error = %res.err().unwrap_or_default(), "control plane loop ended; restarting it");
            ctx.stop();
        });
        self.running = Some(ctx.spawn(running));
    }
}

impl Handler<ReloadTls> for ControlPlane {
    type Result = Result<bool, String>;

    /// Reads the TLS files again and reconnects with them (see [`ReloadTls`]);
    /// commands being executed keep running.
    fn handle(&mut self, _: ReloadTls, ctx: &mut Context<Self>) -> Self::Result {
        if !crate::mqtt::stop_for_new_tls(&mut self.cfg.conn, &mut self.running, ctx)? {
            return Ok(false);
        }
        tracing::info!("control plane TLS files reloaded; reconnecting with them");
        self.started(ctx);
        Ok(true)
    }
}

impl Supervised for ControlPlane {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.metrics
            .actor_restarts
            .with_label_values(&["ControlPlane"])
            .inc();
        tracing::warn!(actor = "ControlPlane", "restarting");
    }
}

/// A request id usable as one topic level.
pub(crate) fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.contains(['/', '+', '#', '\0'])
}

/// Runs one control message; returns the reply topic and payload.
pub async fn handle_message(
    operator: &Operator,
    gateway_id: &str,
    topic: &str,
    payload: &[u8],
) -> (String, Value) {
    let prefix = format!("gateway/{gateway_id}/control/");
    let command = topic.strip_prefix(&prefix).unwrap_or("");
    let refused = |request_id: Value, err: OpError| {
        tracing::warn!(target: "audit", actor = "mqtt", command, outcome = "error", error = %err, "operator command");
        json!({"request_id": request_id, "ok": false, "error": err.to_json()})
    };
    let invalid = format!("{prefix}reply/invalid");
    let mut args: serde_json::Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            let err = OpError::BadRequest(format!("the payload must be a JSON object: {e}"));
            return (invalid, refused(Value::Null, err));
        }
    };
    let request_id = match args.remove("request_id") {
        Some(Value::String(s)) if valid_request_id(&s) => s,
        other => {
            let err = OpError::BadRequest(
                "\"request_id\" must be a string of 1 to 128 characters without '/', '+' or '#'"
                    .into(),
            );
            return (invalid, refused(other.unwrap_or(Value::Null), err));
        }
    };
    let reply_topic = format!("{prefix}reply/{request_id}");
    let reply = match Command::parse(command, Value::Object(args)) {
        Err(e) => refused(json!(request_id), e),
        Ok(cmd) => match operator.execute(cmd, "mqtt").await {
            Ok(v) => json!({"request_id": request_id, "ok": true, "result": v}),
            Err(e) => json!({"request_id": request_id, "ok": false, "error": e.to_json()}),
        },
    };
    (reply_topic, reply)
}

/// Connects through the one MQTT client layer (clean session, the control
/// subscription) and serves commands until the client task ends.
async fn run(
    cfg: MqttIngestConfig,
    gateway_id: String,
    operator: Arc<Operator>,
) -> Result<(), String> {
    let filter = format!("gateway/{gateway_id}/control/+");
    let mut opts = cfg.client_options();
    opts.persistent = false;
    opts.manual_acks = false;
    opts.receive_maximum = None;
    opts.request_capacity = 64;
    opts.subscribe = vec![filter.clone()];
    let (client, mut events) = MqttClient::connect(&opts)?;
    let publisher = client.clone();
    operator.set_device_publisher(Some(Arc::new(move |topic: String, payload: Vec<u8>| {
        let c = publisher.clone();
        Box::pin(async move {
            c.publish(topic, Bytes::from(payload), PublishExtras::default())
                .await
                .map_err(|e| format!("MQTT publish: {e}"))
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>>>>
    })));
    while let Some(event) = events.recv().await {
        match event {
            Event::Subscribed => tracing::info!(topic = %filter, "control plane subscribed"),
            Event::Message(request) => {
                let (op, id, client) = (operator.clone(), gateway_id.clone(), client.clone());
                actix_rt::spawn(async move {
                    let (reply_topic, body) =
                        handle_message(&op, &id, &request.topic, &request.payload).await;
                    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                    reply(&client, &request, reply_topic, bytes).await;
                });
            }
            Event::Disconnected {
                error,
                failures,
                retry_in,
            } if repeats::admit(Kind::MqttReconnect, "control") => {
                tracing::warn!(error = %error, failures, retry_in_ms = retry_in.as_millis() as u64, "control plane disconnected; reconnecting");
            }
            _ => {}
        }
    }
    Err("control plane event loop ended".to_string())
}

/// Sends a reply to the reply topic and, when the request named one (MQTT
/// 5), to its response topic with its correlation data.
pub(crate) async fn reply(client: &MqttClient, request: &Message, topic: String, body: Bytes) {
    if let Err(e) = client
        .publish(topic, body.clone(), PublishExtras::default())
        .await
    {
        tracing::warn!(error = %e, "control plane cannot send a reply");
    }
    let Some(response_topic) = request.response_topic.clone() else {
        return;
    };
    let extras = PublishExtras {
        correlation_data: request.correlation_data.clone(),
        ..PublishExtras::default()
    };
    if let Err(e) = client.publish(response_topic, body, extras).await {
        tracing::warn!(error = %e, "control plane cannot send a reply to the response topic");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_must_be_one_topic_level() {
        assert!(valid_request_id("abc-123"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a/b"));
        assert!(!valid_request_id("a+"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
