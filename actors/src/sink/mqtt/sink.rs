//! The upstream MQTT sink (QoS 1, MQTT 3.1.1 or 5): a batch counts as
//! delivered when the broker has acknowledged every one of its messages.
//!
//! It connects through the one MQTT client layer ([`MqttClient`]) on a
//! persistent session. The client's event-loop task reports the packet id
//! of each outgoing PUBLISH and each incoming PUBACK; a task of the sink
//! keeps the tally of the batch in flight, and `publish` waits until every
//! PUBLISH of its batch has been acked. Publishes are pipelined: up to
//! `outgoing_inflight` are unacknowledged at once.
//!
//! Few duplicates after an outage: a lost connection ends the attempt
//! (`Unavailable`: the dispatcher backs off and the circuit opens as for
//! any unreachable target) but not the batch. rumqttc keeps the
//! unacknowledged publishes of the session (and those still queued) and
//! resends them, with their packet ids, when the broker resumes the
//! session; the sink goes on counting their acks. When the dispatcher
//! retries the same batch, the sink resumes the attempt in flight instead
//! of publishing the batch again. It
//! publishes again only when the broker lost the session (CONNACK without
//! session present: rumqttc dropped what it held) or for another batch.
//! What can still repeat: messages the broker had received whose PUBACK the
//! outage lost (at most the in-flight window). Every copy carries the same
//! `idempotency_key`, in the payload and, on MQTT 5, as a user property.
//!
//! Known gap: publishes of a batch that was dead-lettered may still be
//! resent after a reconnect; their acks are told apart from the next
//! batch's only by packet id.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use super::config::MqttSinkConfig;
use crate::mqtt::client::{ClientOptions, Event, MqttClient, PublishExtras};
use crate::sink::{PublishFuture, Sink, SinkError};
use crate::wal::Batch;

/// Unacknowledged QoS 1 publishes at once (the pipelining window).
const INFLIGHT: u16 = 1000;

/// The tally of the batch in flight, kept by the event task.
#[derive(Debug, Default)]
struct Tally {
    /// First and last seq of the batch being delivered.
    batch: Option<(u64, u64)>,
    /// Its records.
    expected: usize,
    /// Publishes handed to the client so far (a resumed attempt goes on from here).
    queued: usize,
    /// Packet ids sent and not yet acked.
    sent: HashSet<u16>,
    /// Distinct sends counted for the batch.
    sent_count: usize,
    /// Acks counted for the batch.
    acked: usize,
    /// The broker started a new session while the batch was in flight:
    /// rumqttc dropped what it held, so the batch must go again.
    session_lost: bool,
    /// Whether the connection is up: `None` until the first attempt ends.
    connected: Option<bool>,
    /// The last connection error.
    last_error: String,
}

impl Tally {
    fn start(&mut self, key: (u64, u64), expected: usize) {
        *self = Tally {
            batch: Some(key),
            expected,
            connected: self.connected,
            last_error: std::mem::take(&mut self.last_error),
            ..Tally::default()
        };
    }

    fn note(&mut self, event: Event) {
        match event {
            // A resend after a reconnect keeps its packet id: counted once.
            Event::Sent(pkid) if self.sent_count < self.expected && self.sent.insert(pkid) => {
                self.sent_count += 1;
            }
            Event::Acked(pkid) if self.sent.remove(&pkid) => self.acked += 1,
            Event::Connected {
                session_present: false,
            } if self.batch.is_some() && self.acked < self.expected => {
                self.connected = Some(true);
                self.session_lost = true;
            }
            Event::Connected { .. } => self.connected = Some(true),
            Event::Disconnected { error, .. } => {
                self.connected = Some(false);
                self.last_error = error;
            }
            _ => {}
        }
    }
}

/// Publishes records to an upstream broker.
pub struct MqttSink {
    client: MqttClient,
    tally: Arc<Mutex<Tally>>,
    changed: Arc<Notify>,
    prefix: Arc<str>,
    v5: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.task.abort();
        // An attempt still waiting for acks on this client ends now (as an
        // outage) instead of at its timeout; the next one uses the new client.
        if let Ok(mut g) = self.tally.lock() {
            g.connected = Some(false);
            g.last_error = "the client was replaced".into();
        }
        self.changed.notify_waiters();
    }
}

impl MqttSink {
    /// Connects (lazily: the first poll connects) and starts the event task.
    pub fn new(cfg: &MqttSinkConfig) -> Result<Self, SinkError> {
        let mut opts = ClientOptions::new(cfg.conn.clone());
        opts.persistent = true;
        opts.session_expiry = std::time::Duration::from_secs(3600);
        opts.outgoing_inflight = INFLIGHT;
        opts.request_capacity = usize::from(INFLIGHT) * 2;
        opts.event_capacity = usize::from(INFLIGHT) * 2;
        let (client, mut events) = MqttClient::connect(&opts).map_err(SinkError::Config)?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let changed = Arc::new(Notify::new());
        let (t, c) = (tally.clone(), changed.clone());
        // Dropping the sink aborts this task; that drops the event receiver,
        // and the client task ends.
        let task = actix_rt::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Ok(mut g) = t.lock() {
                    g.note(event);
                }
                c.notify_waiters();
            }
        });
        Ok(Self {
            client,
            tally,
            changed,
            prefix: cfg.topic_prefix.trim_end_matches('/').into(),
            v5: cfg.conn.version == crate::mqtt::MqttVersion::V5,
            task,
        })
    }
}

impl Sink for MqttSink {
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture {
        let (client, tally, changed) = (
            self.client.clone(),
            self.tally.clone(),
            self.changed.clone(),
        );
        let (prefix, v5) = (self.prefix.clone(), self.v5);
        Box::pin(async move {
            let key = (batch.first_seq(), batch.last_seq());
            let total = batch.records.len();
            let from = {
                let mut g = tally.lock().map_err(|_| lock_error())?;
                // Broker unreachable: fail fast (the dispatcher backs off and
                // counts it as an outage); what is queued stays queued.
                if g.connected == Some(false) {
                    return Err(unreachable(&g));
                }
                if g.batch == Some(key) && !g.session_lost {
                    g.queued // resume the attempt in flight
                } else {
                    g.start(key, total);
                    0
                }
            };
            for r in &batch.records[from..] {
                let topic = format!("{prefix}/{}/telemetry", r.device_id);
                let extras = PublishExtras {
                    user_properties: if v5 {
                        vec![("idempotency_key".to_string(), r.idempotency_key.clone())]
                    } else {
                        Vec::new()
                    },
                    ..PublishExtras::default()
                };
                client
                    .publish(topic, Bytes::from(r.json.clone().into_bytes()), extras)
                    .await
                    .map_err(|e| SinkError::Retryable(format!("upstream MQTT client: {e}")))?;
                tally.lock().map_err(|_| lock_error())?.queued += 1;
            }
            loop {
                // Registered before the check, so no change slips between them.
                let notified = changed.notified();
                {
                    let g = tally.lock().map_err(|_| lock_error())?;
                    if g.session_lost {
                        return Err(SinkError::Unavailable(
                            "the upstream broker started a new session: publishing the batch again"
                                .into(),
                        ));
                    }
                    if g.acked >= total {
                        return Ok(());
                    }
                    // The attempt ends; the next one resumes where this stopped.
                    if g.connected == Some(false) {
                        return Err(unreachable(&g));
                    }
                }
                notified.await;
            }
        })
    }
}

fn unreachable(t: &Tally) -> SinkError {
    SinkError::Unavailable(format!(
        "upstream MQTT broker unreachable: {}",
        t.last_error
    ))
}

fn lock_error() -> SinkError {
    SinkError::Retryable("MQTT sink state poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_after_a_reconnect_are_counted_once_and_a_new_session_fails_the_batch() {
        let mut t = Tally::default();
        t.start((1, 3), 3);
        for pkid in [1, 2, 3] {
            t.note(Event::Sent(pkid));
        }
        t.note(Event::Acked(1));
        t.note(Event::Disconnected {
            error: "gone".into(),
            failures: 1,
            retry_in: std::time::Duration::ZERO,
        });
        // The session resumes: 2 and 3 are sent again with their ids.
        t.note(Event::Connected {
            session_present: true,
        });
        t.note(Event::Sent(2));
        t.note(Event::Sent(3));
        assert_eq!(t.sent_count, 3);
        t.note(Event::Acked(2));
        t.note(Event::Acked(3));
        assert_eq!(t.acked, 3);
        assert!(!t.session_lost);
        // A new session while a batch is in flight: it must go again.
        t.start((4, 5), 2);
        t.note(Event::Sent(4));
        t.note(Event::Connected {
            session_present: false,
        });
        assert!(t.session_lost);
    }
}
