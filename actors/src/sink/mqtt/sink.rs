//! The upstream MQTT sink (MQTT 3.1.1, QoS 1): a batch counts as delivered
//! when the broker has acknowledged every one of its messages.
//!
//! It connects through the one MQTT client layer ([`MqttClient`]), whose
//! event-loop task reports the packet id of each outgoing PUBLISH and each
//! incoming PUBACK; `publish` waits until
//! every PUBLISH of its batch has been acked. A lost connection fails the
//! batch (retryable); the retry republishes it, and every copy carries the
//! same `idempotency_key` in its payload.
//!
//! Known gap: publishes of a batch that timed out may still sit in the
//! client's queue; if that batch is then dead-lettered, their PUBACKs could be
//! counted for the next batch. The dispatcher retries the *same* batch after a
//! timeout, so this needs a timeout followed by a dead letter; tracking packet
//! ids per batch generation would close it.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::config::MqttSinkConfig;
use crate::mqtt::client::{ClientOptions, Event, MqttClient, PublishExtras};
use crate::sink::{PublishFuture, Sink, SinkError};
use crate::wal::Batch;

#[derive(Clone, Debug)]
enum Note {
    Sent(u16),
    Acked(u16),
    Lost(String),
}

/// Publishes records to an upstream broker.
pub struct MqttSink {
    client: MqttClient,
    notes: broadcast::Sender<Note>,
    prefix: Arc<str>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MqttSink {
    /// Connects (lazily: the first poll connects) and starts the event loop task.
    pub fn new(cfg: &MqttSinkConfig) -> Result<Self, SinkError> {
        let mut opts = ClientOptions::new(&cfg.host, cfg.port, &cfg.client_id);
        opts.tls = cfg.tls.clone();
        opts.username = cfg.username.clone();
        opts.password = cfg.password.clone();
        opts.max_packet_bytes = cfg.max_packet_bytes;
        opts.outgoing_inflight = 100;
        opts.request_capacity = 1024;
        opts.event_capacity = 1024;
        let (client, mut events) = MqttClient::connect(&opts).map_err(SinkError::Config)?;
        let (notes, _) = broadcast::channel(8192);
        let tx = notes.clone();
        // Dropping the sink aborts this task; that drops the event receiver,
        // and the client task ends.
        let task = actix_rt::spawn(async move {
            while let Some(event) = events.recv().await {
                let note = match event {
                    Event::Sent(pkid) => Note::Sent(pkid),
                    Event::Acked(pkid) => Note::Acked(pkid),
                    Event::Disconnected { error, .. } => Note::Lost(error),
                    _ => continue,
                };
                let _ = tx.send(note);
            }
        });
        Ok(Self {
            client,
            notes,
            prefix: cfg.topic_prefix.trim_end_matches('/').into(),
            task,
        })
    }
}

impl Sink for MqttSink {
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture {
        let client = self.client.clone();
        let mut notes = self.notes.subscribe();
        let prefix = self.prefix.clone();
        Box::pin(async move {
            let total = batch.records.len();
            for r in &batch.records {
                let topic = format!("{prefix}/{}/telemetry", r.device_id);
                client
                    .publish(
                        topic,
                        Bytes::from(r.json.clone().into_bytes()),
                        PublishExtras::default(),
                    )
                    .await
                    .map_err(|e| SinkError::Retryable(format!("upstream MQTT client: {e}")))?;
            }
            let mut sent = HashSet::new();
            let mut sent_count = 0usize;
            let mut acked = 0usize;
            while acked < total {
                match notes.recv().await {
                    Ok(Note::Sent(pkid)) => {
                        if sent_count < total {
                            sent.insert(pkid);
                            sent_count += 1;
                        }
                    }
                    Ok(Note::Acked(pkid)) => {
                        if sent.remove(&pkid) {
                            acked += 1;
                        }
                    }
                    Ok(Note::Lost(e)) => {
                        return Err(SinkError::Retryable(format!(
                            "upstream MQTT connection lost: {e}"
                        )))
                    }
                    Err(e) => {
                        return Err(SinkError::Retryable(format!(
                            "upstream MQTT acks lost track: {e}"
                        )))
                    }
                }
            }
            Ok(())
        })
    }
}
