//! The Kafka sink: every record of a batch is produced with key = device id
//! and the headers `idempotency-key`, `correlation-id` (and `traceparent`
//! when the record has one); the batch is delivered when librdkafka has a
//! successful delivery report for every record (acks=all, idempotent
//! producer, so retries inside librdkafka neither duplicate nor reorder).

use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::config::KafkaSinkConfig;
use crate::sink::{PublishFuture, Sent, Sink, SinkError};
use crate::wal::Batch;

/// Produces batches to one topic.
pub struct KafkaSink {
    producer: FutureProducer,
    topic: Arc<str>,
}

impl KafkaSink {
    /// Creates the producer (it connects in the background).
    pub fn new(cfg: &KafkaSinkConfig) -> Result<Self, SinkError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &cfg.compression)
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                cfg.message_timeout
                    .as_millis()
                    .clamp(1000, 900_000)
                    .to_string(),
            );
        let opt = [
            ("security.protocol", &cfg.security_protocol),
            ("ssl.ca.location", &cfg.ssl_ca_file),
            ("ssl.certificate.location", &cfg.ssl_cert_file),
            ("ssl.key.location", &cfg.ssl_key_file),
            ("sasl.mechanism", &cfg.sasl_mechanism),
            ("sasl.username", &cfg.sasl_username),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                c.set(k, v);
            }
        }
        if let Some(p) = &cfg.sasl_password {
            c.set("sasl.password", p.expose());
        }
        for (k, v) in &cfg.extra {
            c.set(k, v);
        }
        let producer: FutureProducer = c
            .create()
            .map_err(|e| SinkError::Config(format!("kafka producer: {e}")))?;
        Ok(Self {
            producer,
            topic: cfg.topic.as_str().into(),
        })
    }
}

fn classify(e: &KafkaError) -> SinkError {
    let permanent = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::TopicAuthorizationFailed
        )
    );
    // The target cannot take records now: the broker is down, or up and
    // failing (an unknown server error, no leader, storage trouble). An
    // outage must not turn a backlog into dead letters, so these do not
    // use up the retry budget (the chaos harness saw a failing broker's
    // "Unknown broker error" dead-letter a backlog when they did).
    let unreachable = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::Unknown
                | RDKafkaErrorCode::BrokerNotAvailable
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                | RDKafkaErrorCode::KafkaStorageError
        )
    );
    if permanent {
        SinkError::Permanent(format!("kafka refused the batch: {e}"))
    } else if unreachable {
        SinkError::Unavailable(format!("kafka: {e}"))
    } else {
        SinkError::Retryable(format!("kafka: {e}"))
    }
}

impl Sink for KafkaSink {
    fn publish(&mut self, batch: Arc<Batch>) -> PublishFuture {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        Box::pin(async move {
            let mut pending = Vec::with_capacity(batch.records.len());
            for r in &batch.records {
                let mut headers = OwnedHeaders::new_with_capacity(3)
                    .insert(Header {
                        key: "idempotency-key",
                        value: Some(r.idempotency_key.as_str()),
                    })
                    .insert(Header {
                        key: "correlation-id",
                        value: Some(r.correlation_id.as_str()),
                    });
                if let Some(tp) = crate::trace::record_traceparent(&r.json) {
                    headers = headers.insert(Header {
                        key: "traceparent",
                        value: Some(tp),
                    });
                }
                let record = FutureRecord::to(&topic)
                    .key(r.device_id.as_str())
                    .payload(r.json.as_str())
                    .headers(headers);
                // The local queue is full: wait for the reports so far and retry the rest later.
                match producer.send_result(record) {
                    Ok(delivery) => pending.push(delivery),
                    Err((e, _)) => {
                        for d in pending {
                            let _ = d.await;
                        }
                        return Err(classify(&e));
                    }
                }
            }
            let mut first_error = None;
            for d in pending {
                match d.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        first_error.get_or_insert(classify(&e));
                    }
                    Err(_) => {
                        first_error.get_or_insert(SinkError::Retryable(
                            "kafka delivery report lost".into(),
                        ));
                    }
                }
            }
            // librdkafka compresses its own message sets and does not say
            // how small they became: the wire bytes are counted as the payload.
            let payload: usize = batch.records.iter().map(|r| r.json.len()).sum();
            match first_error {
                None => Ok(Sent::new(payload, payload)),
                Some(e) => Err(e),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_messages_are_permanent_and_transport_errors_retryable() {
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify(&big), SinkError::Permanent(_)));
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(classify(&down).is_retryable());
        // A broker that is up but failing is an outage, not a bad batch:
        // not counted against the retry budget.
        for code in [
            RDKafkaErrorCode::Unknown,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            let failing = KafkaError::MessageProduction(code);
            assert!(
                matches!(classify(&failing), SinkError::Unavailable(_)),
                "{code:?}"
            );
        }
    }
}
