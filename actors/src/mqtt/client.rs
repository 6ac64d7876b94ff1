//! The one MQTT connection layer: the ingest, the control plane and the
//! upstream sink all connect through [`MqttClient`].
//!
//! It hides the two protocol versions (rumqttc's 3.1.1 and 5 clients) behind
//! one type and owns what every connection needs: TLS (OpenSSL through
//! native-tls), credentials, an optional QoS 1 subscription renewed after
//! every CONNACK, and one reconnect policy ([`Backoff`]: exponential, with
//! jitter, capped). The client's event loop runs on its own task, which
//! must be polled without pause for keep-alives; it reports plain
//! [`Event`]s on a bounded channel. A consumer that stops reading stops the
//! task, and so the socket reads: the backlog stays with the broker.
//!
//! Follow a PUBLISH to its PUBACK: the task turns the incoming packet into
//! an [`Event::Message`] that carries its ack handle; the consumer calls
//! [`MqttClient::ack`] with it when it may (with `manual_acks`), and
//! rumqttc sends the PUBACK.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::tls::MqttTls;
use crate::Secret;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

pub use crate::backoff::Backoff;

/// Where and how to reach a broker: what every MQTT connection of the
/// gateway has (the ingest and the control plane share one; each upstream
/// sink has its own).
#[derive(Debug, Clone)]
pub struct Connection {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS (`mqtts://`), or plain TCP.
    pub tls: Option<MqttTls>,
    /// User name.
    pub username: Option<String>,
    /// Password (read from a file).
    pub password: Option<Secret>,
    /// Client id: a persistent session belongs to it.
    pub client_id: String,
    /// 3.1.1 or 5.
    pub version: MqttVersion,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Largest packet either way.
    pub max_packet_bytes: usize,
    /// Waits between reconnects.
    pub reconnect: Backoff,
}

impl Connection {
    /// `client_id` at `host:port`: MQTT 3.1.1, plain TCP, no credentials,
    /// keep-alive 30 s, packets up to 1 MiB, reconnects from 100 ms to 10 s.
    pub fn new(host: &str, port: u16, client_id: &str) -> Self {
        Self {
            host: host.to_string(),
            port,
            tls: None,
            username: None,
            password: None,
            client_id: client_id.to_string(),
            version: MqttVersion::V311,
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 1 << 20,
            reconnect: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
        }
    }

    /// Reads the TLS files again ([`MqttTls::reread`]); `Ok(false)`: no TLS.
    pub fn reload_tls(&mut self) -> Result<bool, String> {
        match &self.tls {
            Some(tls) => {
                self.tls = Some(tls.reread()?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn transport(&self) -> Result<Option<rumqttc::Transport>, String> {
        self.tls
            .as_ref()
            .map(|tls| {
                super::tls::tls_connector(tls).map(|c| {
                    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::NativeConnector(
                        c,
                    ))
                })
            })
            .transpose()
    }

    fn credentials(&self) -> Option<(String, String)> {
        self.username.as_ref().map(|u| {
            let password = self.password.as_ref().map(Secret::expose).unwrap_or("");
            (u.clone(), password.to_string())
        })
    }
}

/// How one client uses its [`Connection`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Where and how to connect.
    pub conn: Connection,
    /// Keep the session across connections (clean session / clean start off).
    pub persistent: bool,
    /// How long the broker keeps a persistent session while we are away (MQTT 5).
    pub session_expiry: Duration,
    /// Incoming QoS 1 messages are acknowledged by the consumer
    /// ([`MqttClient::ack`]), not by the client on receipt.
    pub manual_acks: bool,
    /// The Receive Maximum we announce (MQTT 5).
    pub receive_maximum: Option<u16>,
    /// Our own QoS 1 publishes in flight at once.
    pub outgoing_inflight: u16,
    /// Requests (publishes, acks) queued towards the event loop.
    pub request_capacity: usize,
    /// Subscribed at QoS 1 after every CONNACK.
    pub subscribe: Vec<String>,
    /// Events buffered towards the consumer.
    pub event_capacity: usize,
    /// The last will: (topic, payload), published retained at QoS 1 by the
    /// broker when the connection drops without a DISCONNECT (a crash, a
    /// kill -9, a lost link).
    pub last_will: Option<(String, Bytes)>,
}

impl ClientOptions {
    /// Defaults for `conn`: clean session, automatic acks, no subscription.
    pub fn new(conn: Connection) -> Self {
        Self {
            conn,
            persistent: false,
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            manual_acks: false,
            receive_maximum: None,
            outgoing_inflight: 100,
            request_capacity: 64,
            subscribe: Vec::new(),
            event_capacity: 64,
            last_will: None,
        }
    }
}

/// An incoming PUBLISH.
#[derive(Debug)]
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// The `traceparent` user property (MQTT 5).
    pub traceparent: Option<String>,
    /// Where a request wants its response (MQTT 5 Response Topic).
    pub response_topic: Option<String>,
    /// The request's Correlation Data, for the response (MQTT 5).
    pub correlation_data: Option<Bytes>,
    ack: Ack,
}

impl Message {
    /// What its PUBACK needs, and nothing more: a message waiting for its
    /// ack keeps neither its payload nor the read buffer that payload is a
    /// slice of (rumqttc's payloads share the connection's read buffer, so
    /// one held payload can pin a whole chunk of it).
    pub fn ack_handle(&self) -> Ack {
        self.ack
    }
}

/// The packet id of a received QoS 1 PUBLISH and the protocol it came on:
/// what [`MqttClient::ack`] needs to send its PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// MQTT 3.1.1.
    V4(u16),
    /// MQTT 5.
    V5(u16),
}

/// What the connection reports.
#[derive(Debug)]
pub enum Event {
    /// The broker accepted the connection (CONNACK). Without
    /// `session_present` the broker starts a new session, and rumqttc drops
    /// the publishes it still held for the old one.
    Connected {
        /// The broker resumed our session.
        session_present: bool,
    },
    /// The subscription of [`ClientOptions::subscribe`] is in place (SUBACK).
    Subscribed,
    /// A PUBLISH arrived.
    Message(Message),
    /// One of our publishes left, with this packet id.
    Sent(u16),
    /// The broker acknowledged our publish with this packet id (PUBACK).
    Acked(u16),
    /// The connection is gone; the task reconnects after `retry_in`.
    Disconnected {
        /// What happened.
        error: String,
        /// Failed attempts in a row.
        failures: u32,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
}

/// Extra properties of an outgoing PUBLISH (sent on MQTT 5, dropped on 3.1.1).
#[derive(Debug, Clone, Default)]
pub struct PublishExtras {
    /// User properties.
    pub user_properties: Vec<(String, String)>,
    /// Correlation Data (a response to a request).
    pub correlation_data: Option<Bytes>,
    /// The broker keeps it as the topic's retained message (state reports).
    pub retain: bool,
}

/// A connection to one broker, either protocol version. Cheap to clone.
#[derive(Clone)]
pub struct MqttClient(Client);

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl MqttClient {
    /// Creates the client and starts its event-loop task (on the current
    /// actix/tokio runtime); the first poll connects. Fails only on bad TLS
    /// material.
    ///
    /// The socket has TCP_NODELAY (rumqttc's default is off): without it
    /// Nagle's algorithm held each small PUBLISH or PUBACK until the peer
    /// acked the previous segment, and with the peer's delayed ACK a batch
    /// of the upstream MQTT sink took 64-128 ms to be acknowledged.
    pub fn connect(opts: &ClientOptions) -> Result<(Self, mpsc::Receiver<Event>), String> {
        let (tx, rx) = mpsc::channel(opts.event_capacity.max(1));
        let c = &opts.conn;
        let transport = c.transport()?;
        let client = match c.version {
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(&c.client_id, &c.host, c.port);
                o.set_keep_alive(c.keep_alive)
                    .set_clean_session(!opts.persistent)
                    .set_manual_acks(opts.manual_acks)
                    .set_inflight(opts.outgoing_inflight)
                    .set_max_packet_size(c.max_packet_bytes, c.max_packet_bytes)
                    .set_request_channel_capacity(opts.request_capacity);
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                if let Some((u, p)) = c.credentials() {
                    o.set_credentials(u, p);
                }
                if let Some((topic, payload)) = &opts.last_will {
                    o.set_last_will(rumqttc::LastWill::new(
                        topic,
                        payload.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(o, opts.request_capacity);
                let mut net = eventloop.network_options();
                net.set_tcp_nodelay(true);
                eventloop.set_network_options(net);
                let polled = V4 {
                    client: client.clone(),
                    eventloop,
                };
                actix_rt::spawn(run(polled, opts.clone(), tx));
                Client::V4(client)
            }
            MqttVersion::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(&c.client_id, &c.host, c.port);
                o.set_keep_alive(c.keep_alive)
                    .set_clean_start(!opts.persistent)
                    .set_manual_acks(opts.manual_acks)
                    .set_outgoing_inflight_upper_limit(opts.outgoing_inflight)
                    .set_receive_maximum(opts.receive_maximum)
                    .set_max_packet_size(Some(c.max_packet_bytes as u32))
                    .set_request_channel_capacity(opts.request_capacity);
                if opts.persistent {
                    o.set_session_expiry_interval(Some(
                        opts.session_expiry.as_secs().min(u32::MAX as u64) as u32,
                    ));
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                if let Some((u, p)) = c.credentials() {
                    o.set_credentials(u, p);
                }
                if let Some((topic, payload)) = &opts.last_will {
                    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        topic,
                        payload.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                }
                let mut net = o.network_options();
                net.set_tcp_nodelay(true);
                o.set_network_options(net);
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, opts.request_capacity);
                let polled = V5 {
                    client: client.clone(),
                    eventloop,
                };
                actix_rt::spawn(run(polled, opts.clone(), tx));
                Client::V5(client)
            }
        };
        Ok((Self(client), rx))
    }

    /// Queues a QoS 1 PUBLISH (waits for room in the request queue).
    pub async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        extras: PublishExtras,
    ) -> Result<(), String> {
        match &self.0 {
            Client::V4(c) => c
                .publish_bytes(topic, rumqttc::QoS::AtLeastOnce, extras.retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                let retain = extras.retain;
                if extras.user_properties.is_empty() && extras.correlation_data.is_none() {
                    c.publish_bytes(topic, qos, retain, payload).await
                } else {
                    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                        user_properties: extras.user_properties,
                        correlation_data: extras.correlation_data,
                        ..Default::default()
                    };
                    c.publish_bytes_with_properties(topic, qos, retain, payload, props)
                        .await
                }
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Acknowledges a received message (sends its PUBACK; with
    /// `manual_acks`), given its [`Message::ack_handle`].
    pub async fn ack(&self, ack: Ack) -> Result<(), String> {
        // rumqttc builds the PUBACK from a PUBLISH's QoS and packet id only.
        match (&self.0, ack) {
            (Client::V4(c), Ack::V4(pkid)) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::<u8>::new());
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            (Client::V5(c), Ack::V5(pkid)) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                    "",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    Vec::<u8>::new(),
                    None,
                );
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            _ => Err("a message acknowledged on another client".into()),
        }
    }
}

/// One poll of a version's event loop, as the common loop sees it.
enum Polled {
    ConnAck(bool),
    SubAck,
    Publish(Message),
    Sent(u16),
    PubAck(u16),
    Other,
}

/// A payload in an allocation of its own. rumqttc's payloads are slices of
/// the connection's read buffer: kept while its records are committed, one
/// would keep the whole buffer it came from alive, and the next read would
/// need a new one. Small telemetry copies cheaply.
fn own(payload: &Bytes) -> Bytes {
    Bytes::copy_from_slice(payload)
}

/// A version's event loop and client, polled by [`run`].
trait Poll {
    async fn poll(&mut self) -> Result<Polled, String>;
    fn subscribe(&self, filter: &str) -> Result<(), String>;
}

struct V4 {
    client: rumqttc::AsyncClient,
    eventloop: rumqttc::EventLoop,
}

impl Poll for V4 {
    async fn poll(&mut self) -> Result<Polled, String> {
        use rumqttc::{Event, Outgoing, Packet};
        Ok(
            match self.eventloop.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::ConnAck(c)) => Polled::ConnAck(c.session_present),
                Event::Incoming(Packet::SubAck(_)) => Polled::SubAck,
                Event::Incoming(Packet::PubAck(a)) => Polled::PubAck(a.pkid),
                Event::Incoming(Packet::Publish(p)) => Polled::Publish(Message {
                    topic: p.topic,
                    payload: own(&p.payload),
                    traceparent: None,
                    response_topic: None,
                    correlation_data: None,
                    ack: Ack::V4(p.pkid),
                }),
                Event::Outgoing(Outgoing::Publish(pkid)) => Polled::Sent(pkid),
                _ => Polled::Other,
            },
        )
    }

    fn subscribe(&self, filter: &str) -> Result<(), String> {
        self.client
            .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .map_err(|e| e.to_string())
    }
}

struct V5 {
    client: rumqttc::v5::AsyncClient,
    eventloop: rumqttc::v5::EventLoop,
}

impl Poll for V5 {
    async fn poll(&mut self) -> Result<Polled, String> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::Event;
        use rumqttc::Outgoing;
        Ok(
            match self.eventloop.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::ConnAck(c)) => Polled::ConnAck(c.session_present),
                Event::Incoming(Packet::SubAck(_)) => Polled::SubAck,
                Event::Incoming(Packet::PubAck(a)) => Polled::PubAck(a.pkid),
                Event::Incoming(Packet::Publish(p)) => {
                    let props = p.properties.as_ref();
                    Polled::Publish(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: own(&p.payload),
                        traceparent: props.and_then(|props| {
                            props
                                .user_properties
                                .iter()
                                .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
                                .map(|(_, v)| v.clone())
                        }),
                        response_topic: props.and_then(|p| p.response_topic.clone()),
                        correlation_data: props.and_then(|p| p.correlation_data.clone()),
                        ack: Ack::V5(p.pkid),
                    })
                }
                Event::Outgoing(Outgoing::Publish(pkid)) => Polled::Sent(pkid),
                _ => Polled::Other,
            },
        )
    }

    fn subscribe(&self, filter: &str) -> Result<(), String> {
        self.client
            .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .map_err(|e| e.to_string())
    }
}

/// The event-loop task, for either version: polls without pause, renews
/// the subscription after every CONNACK, reports events, and reconnects
/// with the backoff. Ends when the consumer drops its receiver.
async fn run<P: Poll>(mut polled: P, opts: ClientOptions, tx: mpsc::Sender<Event>) {
    let mut failures = 0u32;
    loop {
        // The consumer went away (actor restarted, sink dropped): stop,
        // even while the connection is idle.
        let poll = tokio::select! {
            r = polled.poll() => r,
            _ = tx.closed() => return,
        };
        let event = match poll {
            Ok(Polled::ConnAck(session_present)) => {
                failures = 0;
                for filter in &opts.subscribe {
                    if let Err(e) = polled.subscribe(filter) {
                        tracing::error!(error = %e, topic = %filter, client_id = %opts.conn.client_id, "cannot subscribe");
                    }
                }
                Event::Connected { session_present }
            }
            Ok(Polled::SubAck) => Event::Subscribed,
            Ok(Polled::Publish(m)) => Event::Message(m),
            Ok(Polled::Sent(pkid)) => Event::Sent(pkid),
            Ok(Polled::PubAck(pkid)) => Event::Acked(pkid),
            Ok(Polled::Other) => continue,
            Err(error) => {
                failures += 1;
                let retry_in = opts.conn.reconnect.delay(failures);
                if tx
                    .send(Event::Disconnected {
                        error,
                        failures,
                        retry_in,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                actix_rt::time::sleep(retry_in).await;
                continue;
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}
