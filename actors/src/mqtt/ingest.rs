//! `MqttIngest`: subscribes its topic templates (default
//! `devices/{device_id}/telemetry`, see [`super::topics`]) at QoS 1 on a
//! persistent session and acknowledges each message only after its records
//! are in the WAL. A topic that matches no template is refused like any
//! invalid message (counted, logged, acked, never stored).
//!
//! Role: one MQTT client ([`MqttClient`]: manual acknowledgements, clean
//! session/clean start off, MQTT 3.1.1 or 5) whose event loop runs on its own
//! task. Every PUBLISH becomes an `IngestTelemetry` for the `IngestRouter`;
//! the PUBACK is sent when the router answers — after the WAL commit for
//! accepted records, at once for invalid ones (counted and logged, never
//! stored) so poison cannot block the session. Acks leave in the order the
//! messages arrived (a FIFO of in-flight ingests), as MQTT requires.
//!
//! Backpressure: when the WAL refuses appends, the message at the head of the
//! FIFO is retried every 500 ms and nothing behind it is acked; the broker
//! stops sending once its in-flight window (Receive Maximum on MQTT 5,
//! `max_inflight_messages` on Mosquitto) is full, and holds the rest. Ingest
//! resumes by itself when the WAL accepts again. Memory stays bounded even
//! with a broker that ignores the window (measured: Mosquitto 2.0.11 with
//! 3.1.1 clients): at `receive_maximum` messages not yet committed the loop
//! stops taking events, the bounded channel fills, and the event-loop task
//! stops reading the socket. A committed message waits for its PUBACK as an
//! [`Ack`] handle only (packet id and protocol): rumqttc sends one ack per
//! turn of its event loop but reads up to ten messages, so under a flood
//! from such a broker acks queue up; with the payloads they held (slices of
//! the read buffer) that queue took RSS to 145 MB in the MQTT ingest
//! benchmark, now 35-38 MB.
//!
//! Handles [`ReloadTls`] (certificate rotation). Sends `IngestTelemetry` to
//! `IngestRouter`.
//!
//! Restart policy: supervised. Connection failures are not crashes: the loop
//! reconnects with exponential backoff and jitter
//! (`gateway_mqtt_reconnects_total`). If the loop itself ends, the actor
//! stops and its supervisor starts a new client. Lost on restart: messages
//! received and not yet acked — the broker redelivers them on the persistent
//! session, and dedup by idempotency key absorbs the repeats.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc;

use super::client::{Ack, Event, MqttClient};
use super::config::MqttIngestConfig;
use super::topics::{TopicMatch, Topics};
use crate::ingest::{
    IngestError, IngestRouters, IngestTelemetry, PayloadFormat, Rejection, Source,
};
use crate::metrics::Metrics;
use crate::repeats::{self, Kind};

/// Connection state shared with `/readyz`.
#[derive(Debug, Default)]
pub struct MqttStatus {
    /// Connected and subscribed.
    pub connected: AtomicBool,
    /// The last connection error, for `/readyz`.
    pub last_error: Mutex<Option<String>>,
}

/// The MQTT ingest actor.
pub struct MqttIngest {
    /// The broker, topics and TLS it connects with; kept so that a restart
    /// or a TLS reload reconnects with the same settings.
    cfg: MqttIngestConfig,
    /// Where each message goes: the ingest core's one door (validation,
    /// rejects, the durable append), so MQTT and HTTP refuse alike.
    router: IngestRouters,
    /// Connected or not and why, shared with `/readyz` and the status page.
    status: Arc<MqttStatus>,
    /// `gateway_mqtt_connected` and its restarts under supervision.
    metrics: Metrics,
    /// The running session loop; a TLS reload cancels it and starts anew.
    running: Option<SpawnHandle>,
}

impl MqttIngest {
    /// A client for `cfg` feeding `router`.
    pub fn new(
        cfg: MqttIngestConfig,
        router: IngestRouters,
        status: Arc<MqttStatus>,
        metrics: Metrics,
    ) -> Self {
        Self {
            cfg,
            router,
            status,
            metrics,
            running: None,
        }
    }
}

impl Actor for MqttIngest {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (cfg, router, status, metrics) = (
            self.cfg.clone(),
            self.router.clone(),
            self.status.clone(),
            self.metrics.clone(),
        );
        let running = run(cfg, router, status, metrics).into_actor(self).map(|res, act, ctx| {
            act.status.connected.store(false, Ordering::SeqCst);
            act.metrics.mqtt_connected.set(0);
            tracing::error!(error = %res.err().unwrap_or_default(), "MQTT ingest loop ended; restarting it");
            ctx.stop();
        });
        self.running = Some(ctx.spawn(running));
    }
}

/// Reads the connection's TLS files again (certificate rotation:
/// `tls.reload`, SIGHUP) and, when they load, reconnects with them.
/// `Ok(false)`: the connection has no TLS. A set that does not load is
/// refused and the current connection stays.
///
/// Nothing is lost or acknowledged twice: messages received and not yet
/// acked are dropped with the old connection, their ingests still commit,
/// and the broker redelivers them on the persistent session, where dedup by
/// idempotency key absorbs the repeats (as after any reconnect).
pub struct ReloadTls;
impl actix::Message for ReloadTls {
    type Result = Result<bool, String>;
}

/// What every MQTT client actor does first on [`ReloadTls`]: reads `conn`'s
/// TLS files again and, with TLS on, cancels its connection loop
/// (`running`), which the caller then starts again. `Ok(false)`: no TLS,
/// nothing to do.
pub fn stop_for_new_tls<A: Actor<Context = Context<A>>>(
    conn: &mut super::client::Connection,
    running: &mut Option<SpawnHandle>,
    ctx: &mut Context<A>,
) -> Result<bool, String> {
    if !conn.reload_tls()? {
        return Ok(false);
    }
    if let Some(r) = running.take() {
        ctx.cancel_future(r);
    }
    Ok(true)
}
impl Handler<ReloadTls> for MqttIngest {
    type Result = Result<bool, String>;

    fn handle(&mut self, _: ReloadTls, ctx: &mut Context<Self>) -> Self::Result {
        if !stop_for_new_tls(&mut self.cfg.conn, &mut self.running, ctx)? {
            return Ok(false);
        }
        self.status.connected.store(false, Ordering::SeqCst);
        self.metrics.mqtt_connected.set(0);
        tracing::info!(host = %self.cfg.conn.host, port = self.cfg.conn.port, "MQTT ingest TLS files reloaded; reconnecting with them");
        self.started(ctx);
        Ok(true)
    }
}

impl Supervised for MqttIngest {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.metrics
            .actor_restarts
            .with_label_values(&["MqttIngest"])
            .inc();
        tracing::warn!(actor = "MqttIngest", "restarting");
    }
}

/// Ingests one message until the router has an answer that allows the ack.
async fn ingest_until_ackable(
    router: IngestRouters,
    format: PayloadFormat,
    topics: Arc<Topics>,
    topic: String,
    payload: Bytes,
    traceparent: Option<String>,
) {
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let Some(TopicMatch {
        device_id,
        tags: topic_tags,
    }) = topics.read(&topic)
    else {
        let r = Rejection {
            reason: "invalid_topic",
            message: format!("topic {topic:?} matches no template of mqtt.topics"),
        };
        router.reject(Source::Mqtt, "", &correlation_id, &r);
        return;
    };
    let span = crate::trace::ingest_span(
        Source::Mqtt.as_str(),
        &device_id,
        &correlation_id,
        traceparent.as_deref(),
    );
    let mut warned = false;
    loop {
        let msg = IngestTelemetry {
            source: Source::Mqtt,
            device_id: device_id.clone(),
            payload: payload.clone(),
            payload_format: format,
            correlation_id: correlation_id.clone(),
            idempotency_key: None,
            traceparent: traceparent.clone(),
            span: span.clone(),
            topic_tags: topic_tags.clone(),
        };
        match router.for_device(&device_id).send(msg).await {
            // Stored, or refused for good (counted and logged by the router):
            // either way the broker may forget it.
            Ok(Ok(_))
            | Ok(Err(IngestError::Rejected(_)))
            | Ok(Err(IngestError::RateLimited { .. })) => return,
            Ok(Err(e @ (IngestError::Backpressure(_) | IngestError::Unavailable(_)))) => {
                if !warned {
                    if repeats::admit(Kind::IngestUnavailable, "mqtt") {
                        tracing::warn!(device_id = %device_id, error = %e, "MQTT ingest paused: WAL refuses appends; holding the message unacknowledged");
                    }
                    warned = true;
                }
            }
            Err(e) => {
                if !warned {
                    if repeats::admit(Kind::IngestUnavailable, "mqtt") {
                        tracing::warn!(error = %e, "ingest router unavailable; holding the message unacknowledged");
                    }
                    warned = true;
                }
            }
        }
        actix_rt::time::sleep(Duration::from_millis(500)).await;
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Ack>>>;

/// Connects through the one MQTT client layer and ingests until the client
/// task ends: every message goes to the router, and its PUBACK leaves, in
/// arrival order, once the router's answer allows it.
async fn run(
    cfg: MqttIngestConfig,
    router: IngestRouters,
    status: Arc<MqttStatus>,
    metrics: Metrics,
) -> Result<(), String> {
    let (client, mut events) = MqttClient::connect(&cfg.client_options())?;
    // Acks leave through their own task, in order: `ack().await` waits for
    // room in the client's request queue without holding up this loop
    // (which must keep reading for the event-loop task to keep polling).
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
    let acker = client.clone();
    actix_rt::spawn(async move {
        while let Some(ack) = ack_rx.recv().await {
            if acker.ack(ack).await.is_err() {
                return;
            }
        }
    });
    let limit = usize::from(cfg.receive_maximum).max(1);
    let topics = Arc::new(cfg.topics.clone());
    let mut inflight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    loop {
        tokio::select! {
            ev = events.recv(), if inflight.len() < limit => match ev {
                None => return Err("MQTT event loop task ended".to_string()),
                Some(Event::Subscribed) => note_connected(&status, &metrics, &cfg.conn.host, cfg.conn.port),
                // The broker redelivers whatever was not acked; the
                // ingests already sent still commit (dedup absorbs the
                // repeats), their acks are simply not awaited any more.
                Some(Event::Disconnected { error, failures, retry_in }) => {
                    note_disconnected(&status, &metrics, &error, failures, retry_in);
                    inflight = FuturesOrdered::new();
                }
                Some(Event::Message(message)) => {
                    // Only the ack handle waits with the ingest: the
                    // payload goes to the router and is freed with it.
                    let ack = message.ack_handle();
                    let fut = ingest_until_ackable(
                        router.clone(),
                        cfg.payload_format,
                        topics.clone(),
                        message.topic,
                        message.payload,
                        message.traceparent,
                    );
                    inflight.push_back(Box::pin(async move {
                        fut.await;
                        ack
                    }));
                }
                Some(_) => {}
            },
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                if ack_tx.send(done).is_err() {
                    return Err("MQTT ack task ended".to_string());
                }
            }
        }
    }
}

fn note_connected(status: &MqttStatus, metrics: &Metrics, host: &str, port: u16) {
    if !status.connected.swap(true, Ordering::SeqCst) {
        tracing::info!(host, port, "MQTT ingest connected and subscribed");
    }
    metrics.mqtt_connected.set(1);
    if let Ok(mut g) = status.last_error.lock() {
        *g = None;
    }
}

fn note_disconnected(
    status: &MqttStatus,
    metrics: &Metrics,
    error: &str,
    failures: u32,
    delay: Duration,
) {
    status.connected.store(false, Ordering::SeqCst);
    metrics.mqtt_connected.set(0);
    metrics.mqtt_reconnects.inc();
    if let Ok(mut g) = status.last_error.lock() {
        *g = Some(error.to_string());
    }
    if repeats::admit(Kind::MqttReconnect, "ingest") {
        tracing::warn!(
            error,
            failures,
            retry_in_ms = delay.as_millis() as u64,
            "MQTT ingest disconnected; reconnecting"
        );
    }
}
