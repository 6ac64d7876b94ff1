//! The embedded MQTT broker (`mqtt.url = "embedded"`, cargo feature
//! `embedded-broker`): rumqttd in-process on `mqtt.embedded_addr`, MQTT 3.1.1,
//! so a first run accepts `mosquitto_pub` with nothing else installed.
//!
//! Know its limit: an in-process broker acknowledges a device's QoS 1
//! message when *it* has it in memory, before the gateway's WAL commit. The
//! gateway still acks the broker only after fsync, but a crash of the whole
//! process loses what the broker held. For the full promise, run Mosquitto
//! (persistence on) and point `mqtt.url` at it.
//!
//! Its memory is bounded: rumqttd keeps every message in an in-memory log of
//! segments per subscription filter until the log is full, whether or not
//! the subscribers have it yet, and then drops the oldest segment. With
//! rumqttd's own sizes (tens of MB per segment) a gateway under steady load
//! grew by ~20 MB a minute, up to 640 MB; here each filter's log holds at
//! most [`SEGMENT_COUNT`] segments of [`SEGMENT_BYTES`] (4 MiB of topics and
//! payloads, or more if one payload is larger than a segment), then stays
//! flat. rumqttd counts only topic and payload bytes: each stored message
//! also holds its packet struct and properties (~400 bytes), so small
//! telemetry messages cost about four times the counted size (~16 MB).
//!
//! The same bound is the embedded broker's lag window, and rumqttd has no
//! flow control towards publishers: a gateway that falls more than 4 MiB
//! of messages (~30,000 small ones) behind its devices (a burst far above its ingest rate, or
//! WAL backpressure) misses the oldest of them although the broker
//! acknowledged them (rumqttd logs "jumping to head" at warn). Mosquitto
//! has no such window: use it where bursts or long backpressure are
//! expected.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Bytes of one segment of a subscription filter's in-memory log.
pub const SEGMENT_BYTES: usize = 1 << 20;
/// Segments a filter's log keeps before it drops the oldest.
pub const SEGMENT_COUNT: usize = 4;

/// Starts the broker on its own threads and waits until it accepts connections.
pub fn start_embedded(addr: SocketAddr, max_payload_bytes: usize) -> anyhow::Result<()> {
    // rumqttd only logs a bind failure from its own thread: check first.
    TcpListener::bind(addr).with_context(|| format!("mqtt.embedded_addr {addr} is not free"))?;
    let server = ServerSettings {
        name: "embedded-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: max_payload_bytes,
            max_inflight_count: 1000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 1000,
            max_segment_size: SEGMENT_BYTES.max(max_payload_bytes),
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("embedded".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })?;
    let start = Instant::now();
    while !answers_connect(addr) {
        if start.elapsed() > Duration::from_secs(5) {
            bail!("the embedded MQTT broker did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(addr = %addr, "embedded MQTT broker listening (MQTT 3.1.1)");
    Ok(())
}

/// A real MQTT 3.1.1 CONNECT → CONNACK → DISCONNECT exchange: the broker is
/// up when it accepts a session, not merely when its port is open.
fn answers_connect(addr: SocketAddr) -> bool {
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let connect: [u8; 19] = [
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 5, b'p', b'r', b'o', b'b', b'e',
    ];
    let mut connack = [0u8; 4];
    let ok = conn.write_all(&connect).is_ok()
        && conn.read_exact(&mut connack).is_ok()
        && connack == [0x20, 2, 0, 0];
    let _ = conn.write_all(&[0xE0, 0]);
    ok
}
