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
//! With `payload = "batch"` (DESIGN §6b) a batch goes as one PUBLISH of
//! NDJSON, compressed as configured, on `{topic_prefix}/{gateway_id}/batch`
//! (several when its body would pass the broker's packet limit: each part
//! is a batch of its own for the consumer). On MQTT 5 it carries the user
//! properties `content-encoding`, `records`, `first-seq` and `last-seq`;
//! every record inside keeps its `idempotency_key`, so a consumer dedups
//! per record whatever the batching. The tally counts PUBLISHes, not
//! records, so resuming works the same for both payloads.
//!
//! Known gap: publishes of a batch that was dead-lettered may still be
//! resent after a reconnect; their acks are told apart from the next
//! batch's only by packet id.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use super::config::{MqttSinkConfig, Payload};
use crate::mqtt::client::{ClientOptions, Event, MqttClient, PublishExtras};
use crate::sink::{Compression, PublishFuture, Sent, Sink, SinkError};
use crate::wal::{Batch, StoredRecord};

/// Raw NDJSON per batch PUBLISH at most: the client's 1 MiB packet limit
/// less room for the topic and properties (compression only shrinks it;
/// zstd's worst case on incompressible input adds well under this margin).
const BATCH_PART_BYTES: usize = (1 << 20) - (64 << 10);

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
    /// `{topic_prefix}/{gateway_id}/batch`.
    batch_topic: Arc<str>,
    payload: Payload,
    compression: Compression,
    task: tokio::task::JoinHandle<()>,
}

/// One PUBLISH of a batch.
struct Message {
    topic: String,
    body: Bytes,
    extras: PublishExtras,
    /// Its bytes before compression.
    payload_bytes: usize,
}

/// The PUBLISHes of `batch`: one per record, or the batch as NDJSON in as
/// few parts as the packet limit allows. The same batch always gives the
/// same messages (a resumed attempt goes on from a count).
fn messages(
    batch: &Batch,
    payload: Payload,
    compression: Compression,
    prefix: &str,
    batch_topic: &str,
    v5: bool,
) -> Result<Vec<Message>, SinkError> {
    match payload {
        Payload::Record => Ok(batch
            .records
            .iter()
            .map(|r| Message {
                topic: format!("{prefix}/{}/telemetry", r.device_id),
                body: Bytes::from(r.json.clone().into_bytes()),
                extras: PublishExtras {
                    user_properties: if v5 {
                        vec![("idempotency_key".to_string(), r.idempotency_key.clone())]
                    } else {
                        Vec::new()
                    },
                    ..PublishExtras::default()
                },
                payload_bytes: r.json.len(),
            })
            .collect()),
        Payload::Batch => batch_parts(&batch.records)
            .into_iter()
            .map(|part| {
                let raw: usize = part.iter().map(|r| r.json.len() + 1).sum();
                let body = compression
                    .ndjson(part.iter().map(|r| r.json.as_bytes()), raw)
                    .map_err(|e| {
                        SinkError::Retryable(format!("{}: {e}", compression.encoding()))
                    })?;
                let (first, last) = (
                    part.first().map_or(0, |r| r.seq),
                    part.last().map_or(0, |r| r.seq),
                );
                let user_properties = if v5 {
                    vec![
                        (
                            "content-encoding".to_string(),
                            compression.encoding().to_string(),
                        ),
                        ("records".to_string(), part.len().to_string()),
                        ("first-seq".to_string(), first.to_string()),
                        ("last-seq".to_string(), last.to_string()),
                    ]
                } else {
                    Vec::new()
                };
                Ok(Message {
                    topic: batch_topic.to_string(),
                    body: Bytes::from(body),
                    extras: PublishExtras {
                        user_properties,
                        ..PublishExtras::default()
                    },
                    payload_bytes: raw,
                })
            })
            .collect(),
    }
}

/// `records` cut into runs of at most [`BATCH_PART_BYTES`] of NDJSON (a
/// single larger record is a run of its own).
fn batch_parts(records: &[StoredRecord]) -> Vec<&[StoredRecord]> {
    let mut parts = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let len = r.json.len() + 1;
        if i > start && size + len > BATCH_PART_BYTES {
            parts.push(&records[start..i]);
            (start, size) = (i, 0);
        }
        size += len;
    }
    if start < records.len() {
        parts.push(&records[start..]);
    }
    parts
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
            batch_topic: format!(
                "{}/{}/batch",
                cfg.topic_prefix.trim_end_matches('/'),
                cfg.gateway_id
            )
            .into(),
            payload: cfg.payload,
            compression: cfg.compression,
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
        let (prefix, v5, batch_topic) = (self.prefix.clone(), self.v5, self.batch_topic.clone());
        let (payload, compression) = (self.payload, self.compression);
        Box::pin(async move {
            let key = (batch.first_seq(), batch.last_seq());
            let msgs = messages(&batch, payload, compression, &prefix, &batch_topic, v5)?;
            let total = msgs.len();
            let sent = Sent {
                payload_bytes: msgs.iter().map(|m| m.payload_bytes as u64).sum(),
                wire_bytes: msgs.iter().map(|m| m.body.len() as u64).sum(),
            };
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
            for m in msgs.into_iter().skip(from) {
                client
                    .publish(m.topic, m.body, m.extras)
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
                        return Ok(sent);
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
    fn a_batch_past_the_packet_limit_goes_in_parts_that_keep_every_record_once() {
        let record = |seq: u64| StoredRecord {
            seq,
            device_id: "d".into(),
            idempotency_key: format!("d:{seq}"),
            correlation_id: String::new(),
            receive_ms: 0,
            class: crate::route::Class::Normal,
            json: "x".repeat(100_000),
        };
        let records: Vec<StoredRecord> = (1..=25).map(record).collect();
        let parts = batch_parts(&records);
        assert_eq!(parts.len(), 3, "25 records of 100 kB in parts under 960 kB");
        assert!(parts
            .iter()
            .all(|p| p.iter().map(|r| r.json.len() + 1).sum::<usize>() <= BATCH_PART_BYTES));
        let seqs: Vec<u64> = parts.iter().flat_map(|p| p.iter().map(|r| r.seq)).collect();
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>());
        assert_eq!(batch_parts(&records[..1]).len(), 1);
    }

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
