//! `MqttIngest`: subscribes `devices/+/telemetry` at QoS 1 on a persistent
//! session and acknowledges each message only after its records are in the
//! WAL.
//!
//! Role: one MQTT client (`rumqttc`, manual acknowledgements, clean
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
//! 3.1.1 clients): at `receive_maximum` unacked messages the loop stops
//! taking events, the bounded channel fills, and the event-loop task stops
//! reading the socket until acks free room.
//!
//! Handles nothing but its own lifecycle. Sends `IngestTelemetry` to
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

use super::config::{MqttIngestConfig, MqttVersion};
use crate::ingest::{IngestError, IngestRouter, IngestTelemetry, PayloadFormat, Source};
use crate::metrics::Metrics;

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
    cfg: MqttIngestConfig,
    router: Addr<IngestRouter>,
    status: Arc<MqttStatus>,
    metrics: Metrics,
}

impl MqttIngest {
    /// A client for `cfg` feeding `router`.
    pub fn new(
        cfg: MqttIngestConfig,
        router: Addr<IngestRouter>,
        status: Arc<MqttStatus>,
        metrics: Metrics,
    ) -> Self {
        Self {
            cfg,
            router,
            status,
            metrics,
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
        let run = async move {
            match cfg.version {
                MqttVersion::V311 => v4::run(cfg, router, status, metrics).await,
                MqttVersion::V5 => v5::run(cfg, router, status, metrics).await,
            }
        };
        ctx.spawn(run.into_actor(self).map(|res, act, ctx| {
            act.status.connected.store(false, Ordering::SeqCst);
            act.metrics.mqtt_connected.set(0);
            tracing::error!(error = %res.err().unwrap_or_default(), "MQTT ingest loop ended; restarting it");
            ctx.stop();
        }));
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

/// The device id of `devices/{device_id}/telemetry` (any topic: second level).
fn device_of(topic: &str) -> &str {
    topic.split('/').nth(1).unwrap_or("")
}

/// Ingests one message until the router has an answer that allows the ack.
async fn ingest_until_ackable(
    router: Addr<IngestRouter>,
    format: PayloadFormat,
    topic: String,
    payload: Bytes,
    traceparent: Option<String>,
) {
    let device_id = device_of(&topic).to_string();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let span = crate::trace::ingest_span(
        Source::Mqtt,
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
        };
        match router.send(msg).await {
            // Stored, or refused for good (counted and logged by the router):
            // either way the broker may forget it.
            Ok(Ok(_))
            | Ok(Err(IngestError::Rejected(_)))
            | Ok(Err(IngestError::RateLimited { .. })) => return,
            Ok(Err(e @ (IngestError::Backpressure(_) | IngestError::Unavailable(_)))) => {
                if !warned {
                    tracing::warn!(device_id = %device_id, error = %e, "MQTT ingest paused: WAL refuses appends; holding the message unacknowledged");
                    warned = true;
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "ingest router unavailable; holding the message unacknowledged");
                    warned = true;
                }
            }
        }
        actix_rt::time::sleep(Duration::from_millis(500)).await;
    }
}

type AckFuture<P> = Pin<Box<dyn Future<Output = P>>>;

/// What the event-loop task reports to the ingest loop.
enum LoopEvent<P> {
    Connected,
    Publish(P),
    Disconnected,
}

macro_rules! ingest_loop {
    ($cfg:expr, $router:expr, $client:expr, $events:expr, $topic_of:expr, $traceparent_of:expr) => {{
        // Acks leave through their own task, in order: `ack().await` waits for
        // room in the client's request channel without holding up this loop
        // (which must keep reading for the event-loop task to keep polling).
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        let acker = $client.clone();
        actix_rt::spawn(async move {
            while let Some(publish) = ack_rx.recv().await {
                if acker.ack(&publish).await.is_err() {
                    return;
                }
            }
        });
        let limit = usize::from($cfg.receive_maximum).max(1);
        let mut inflight: FuturesOrdered<AckFuture<_>> = FuturesOrdered::new();
        loop {
            tokio::select! {
                ev = $events.recv(), if inflight.len() < limit => match ev {
                    None => return Err("MQTT event loop task ended".to_string()),
                    Some(LoopEvent::Connected) => {}
                    // The broker redelivers whatever was not acked; the
                    // ingests already sent still commit (dedup absorbs the
                    // repeats), their acks are simply not awaited any more.
                    Some(LoopEvent::Disconnected) => inflight = FuturesOrdered::new(),
                    Some(LoopEvent::Publish(publish)) => {
                        let topic: String = $topic_of(&publish);
                        let traceparent: Option<String> = $traceparent_of(&publish);
                        let payload = publish.payload.clone();
                        let fut = ingest_until_ackable($router.clone(), $cfg.payload_format, topic, payload, traceparent);
                        inflight.push_back(Box::pin(async move {
                            fut.await;
                            publish
                        }));
                    }
                },
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    if ack_tx.send(done).is_err() {
                        return Err("MQTT ack task ended".to_string());
                    }
                }
            }
        }
    }};
}

/// TLS, credentials and the client: the same for both protocol versions.
macro_rules! connect {
    ($opts:expr, $cfg:expr, $client:ident) => {{
        crate::mqtt::tls::secure_options!($opts, $cfg);
        $client::new($opts, usize::from($cfg.receive_maximum) * 2 + 16)
    }};
}

/// Runs the client's event loop on its own task (it must be polled without
/// pause for keep-alives), reporting connects, publishes and disconnects,
/// and reconnecting with backoff. Written once for both protocol versions:
/// the caller's scope provides `Event`, `Packet`, `Publish` and `QoS`.
macro_rules! spawn_event_task {
    ($cfg:expr, $status:expr, $metrics:expr, $client:expr, $eventloop:expr) => {{
        // Bounded: when the ingest loop holds its limit of unacked messages it
        // stops reading here, this task stops polling, and the socket's backlog
        // stays with the broker instead of in our memory.
        let (tx, events) = mpsc::channel::<LoopEvent<Publish>>(64);
        let (st, m, c, c2) = ($status.clone(), $metrics.clone(), $cfg.clone(), $client.clone());
        actix_rt::spawn(async move {
            let mut failures = 0u32;
            loop {
                match $eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failures = 0;
                        if let Err(e) = c2.try_subscribe(c.topic.clone(), QoS::AtLeastOnce) {
                            tracing::error!(error = %e, "cannot subscribe");
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        note_connected(&st, &m, &c.host, c.port);
                        if tx.send(LoopEvent::Connected).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(LoopEvent::Publish(p)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failures += 1;
                        let delay = c.reconnect_delay(failures);
                        note_disconnected(&st, &m, &e.to_string(), failures, delay);
                        if tx.send(LoopEvent::Disconnected).await.is_err() {
                            return;
                        }
                        actix_rt::time::sleep(delay).await;
                    }
                }
            }
        });
        events
    }};
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
    tracing::warn!(
        error,
        failures,
        retry_in_ms = delay.as_millis() as u64,
        "MQTT ingest disconnected; reconnecting"
    );
}

mod v4 {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};

    use super::*;

    pub(super) async fn run(
        cfg: MqttIngestConfig,
        router: Addr<IngestRouter>,
        status: Arc<MqttStatus>,
        metrics: Metrics,
    ) -> Result<(), String> {
        let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
        opts.set_keep_alive(cfg.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
            .set_request_channel_capacity(usize::from(cfg.receive_maximum) * 2 + 16);
        let (client, mut eventloop) = connect!(opts, cfg, AsyncClient);
        let mut events = spawn_event_task!(cfg, status, metrics, client, eventloop);
        let topic_of = |p: &Publish| p.topic.clone();
        let traceparent_of = |_: &Publish| None;
        ingest_loop!(cfg, router, client, events, topic_of, traceparent_of)
    }
}

mod v5 {
    use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    use super::*;

    pub(super) async fn run(
        cfg: MqttIngestConfig,
        router: Addr<IngestRouter>,
        status: Arc<MqttStatus>,
        metrics: Metrics,
    ) -> Result<(), String> {
        let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
        opts.set_keep_alive(cfg.keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(
                cfg.session_expiry.as_secs().min(u32::MAX as u64) as u32
            ))
            .set_receive_maximum(Some(cfg.receive_maximum))
            .set_manual_acks(true)
            .set_max_packet_size(Some(cfg.max_packet_bytes as u32))
            .set_request_channel_capacity(usize::from(cfg.receive_maximum) * 2 + 16);
        let (client, mut eventloop) = connect!(opts, cfg, AsyncClient);
        let mut events = spawn_event_task!(cfg, status, metrics, client, eventloop);
        let topic_of = |p: &Publish| String::from_utf8_lossy(&p.topic).into_owned();
        let traceparent_of = |p: &Publish| {
            p.properties.as_ref().and_then(|props| {
                props
                    .user_properties
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
                    .map(|(_, v)| v.clone())
            })
        };
        ingest_loop!(cfg, router, client, events, topic_of, traceparent_of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_id_is_the_second_topic_level() {
        assert_eq!(device_of("devices/dev-1/telemetry"), "dev-1");
        assert_eq!(device_of("devices"), "");
    }
}
