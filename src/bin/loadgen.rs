//! `loadgen`: drives the gateway's ingest like a fleet of devices, and keeps
//! a list of every record that was acknowledged, so that a checker can prove
//! what must have arrived (the benchmarks and `make chaos` use it).
//!
//! ```text
//! loadgen http --url http://127.0.0.1:8080 --devices 20 --connections 8 --rate 2000 --duration 60s --acked acked.txt
//! loadgen mqtt --url mqtt://127.0.0.1:1883 --devices 20 --rate 2000 --count 100000 --format protobuf
//! ```
//!
//! - `http`: keep-alive POSTs of one record each over N connections; 202
//!   and 200 (a duplicate) are acknowledgements; 429 and 503 are retried
//!   after their `Retry-After`; a lost connection is reconnected (the record
//!   in flight is sent again: it is not acknowledged until an answer says so).
//! - `mqtt`: one QoS 1 connection per device, publishing to
//!   `devices/{device_id}/telemetry` (or `--topic`); a PUBACK is the
//!   acknowledgement. Persistent sessions: after a broker restart the client
//!   resends what was not acknowledged.
//! - `--rate 0` (the default) sends as fast as acknowledgements allow.
//! - Every record has a unique `msg_id` (`{run}-{worker}-{n}`); `--acked FILE`
//!   gets one line `device_id:msg_id` per acknowledged record, flushed every
//!   100 ms, so the list is there even when loadgen is killed.
//! - `--format site` sends realistic telemetry (DESIGN §6b's uplink
//!   figures): per device three slowly varying floats (a temperature that
//!   walks ±0.05 a reading, a humidity ±0.1, a pressure ±0.05), a counter,
//!   a boolean that rarely flips, and two tags; ~200 B of JSON, ~400 B once
//!   canonical.
//! - On exit it prints one JSON line: sent, acknowledged, errors, rate and
//!   the send → acknowledgement latency (p50, p99, max).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use prost::Message as _;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Device load for the gateway, with a list of what was acknowledged"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// POST /ingest/{device_id} over keep-alive connections.
    Http {
        /// The gateway's base URL (http:// only).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Connections (each a thread).
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// A device token sent as `Authorization: Bearer` (read from this file).
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// QoS 1 publishes, one connection per device.
    Mqtt {
        /// The broker.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        url: String,
        /// Topic, `{device_id}` replaced.
        #[arg(long, default_value = "devices/{device_id}/telemetry")]
        topic: String,
        /// Unacknowledged publishes per connection.
        #[arg(long, default_value_t = 100)]
        inflight: u16,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Distinct device ids (`{prefix}-{n}`).
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Device id prefix.
    #[arg(long, default_value = "lg")]
    device_prefix: String,
    /// Records per second in all (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Stop after this many records sent (0: no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Stop after this long (e.g. 60s; default: until --count, or forever).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Payload encoding.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Approximate payload size in bytes (padded with a string metric).
    #[arg(long, default_value_t = 0)]
    size: usize,
    /// Run id in every msg_id (default: the start time).
    #[arg(long)]
    run_id: Option<String>,
    /// Append `device_id:msg_id` of every acknowledged record here.
    #[arg(long)]
    acked: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Json,
    Protobuf,
    /// Realistic telemetry: slowly varying floats, a counter, a boolean, tags.
    Site,
}

/// One device's readings in `--format site`, in hundredths (so the walks
/// print without float noise).
#[derive(Clone, Copy, Default)]
struct Walk {
    temperature: i64,
    humidity: i64,
    pressure: i64,
    readings: u64,
    door: bool,
}

/// A cheap deterministic hash of a record number (splitmix64).
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Shared counters and the acknowledged list.
struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    refused: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    acked_tx: Option<mpsc::Sender<String>>,
    stop: AtomicBool,
}

impl Stats {
    fn ack(&self, key: String, sent_at: Instant) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        let us = sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32;
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(us);
        }
        if let Some(tx) = &self.acked_tx {
            let _ = tx.send(key);
        }
    }
}

/// Hands out record numbers at the configured rate (shared by all workers).
struct Pacer {
    start: Instant,
    rate: f64,
    next: AtomicU64,
    count: u64,
    until: Option<Instant>,
}

impl Pacer {
    /// The next record number, after waiting for its turn; `None` when done.
    fn next(&self, stats: &Stats) -> Option<u64> {
        if stats.stop.load(Ordering::Relaxed) || self.until.is_some_and(|u| Instant::now() >= u) {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if self.count > 0 && n >= self.count {
            return None;
        }
        if self.rate > 0.0 {
            let due = self.start + Duration::from_secs_f64(n as f64 / self.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Some(n)
    }
}

struct Payloads {
    run: String,
    format: Format,
    size: usize,
    devices: usize,
    prefix: String,
    /// `--format site`: each device's walk, by device number.
    walks: Mutex<HashMap<u64, Walk>>,
}

impl Payloads {
    /// Record `n` of `--format site`: the next reading of its device.
    fn site(&self, n: u64, msg_id: &str, ts: i64) -> Vec<u8> {
        let dev = n % self.devices.max(1) as u64;
        let r = mix(n);
        let step = |bits: u64, by: i64| if (r >> bits) & 1 == 0 { by } else { -by };
        let w = {
            let mut walks = self.walks.lock().unwrap_or_else(|e| e.into_inner());
            let w = walks.entry(dev).or_insert_with(|| Walk {
                temperature: 1800 + (dev % 60) as i64 * 10,
                humidity: 4000 + (dev % 20) as i64 * 50,
                pressure: 101_200 + (dev % 10) as i64 * 10,
                readings: 1000 + dev * 37,
                door: false,
            });
            w.temperature += step(0, 5);
            w.humidity += step(1, 10);
            w.pressure += step(2, 5);
            w.readings += 1;
            if (r >> 8) % 500 == 0 {
                w.door = !w.door;
            }
            *w
        };
        let c = |x: i64| format!("{}.{:02}", x.div_euclid(100), x.rem_euclid(100));
        format!(
            r#"{{"msg_id":"{msg_id}","ts":{ts},"metrics":{{"temperature_c":{},"humidity_pct":{},"pressure_hpa":{},"cycles":{},"door_open":{}}},"tags":{{"site":"north","line":"line-{}"}}}}"#,
            c(w.temperature),
            c(w.humidity),
            c(w.pressure),
            w.readings,
            w.door,
            dev % 4
        )
        .into_bytes()
    }

    fn device(&self, n: u64) -> String {
        format!("{}-{}", self.prefix, n % self.devices.max(1) as u64)
    }

    /// (device_id, msg_id, payload) of record `n`.
    fn make(&self, n: u64) -> (String, String, Vec<u8>) {
        let device = self.device(n);
        let msg_id = format!("{}-{n}", self.run);
        let ts = chrono::Utc::now().timestamp_millis();
        let t = (n % 400) as f64 / 10.0;
        let body = match self.format {
            Format::Site => self.site(n, &msg_id, ts),
            Format::Json => {
                let mut s = format!(r#"{{"msg_id":"{msg_id}","ts":{ts},"metrics":{{"t":{t}"#);
                let pad = self.size.saturating_sub(s.len() + 12);
                if pad > 0 {
                    s.push_str(&format!(r#","pad":"{}""#, "x".repeat(pad.min(250))));
                }
                s.push_str("}}");
                s.into_bytes()
            }
            Format::Protobuf => {
                use gateway_actors::ingest::protobuf::{
                    metric_value::Value, telemetry::Ts, MetricValue, Telemetry,
                };
                let mut m = std::collections::BTreeMap::new();
                m.insert(
                    "t".to_string(),
                    MetricValue {
                        value: Some(Value::Number(t)),
                    },
                );
                let pad = self.size.saturating_sub(msg_id.len() + 24);
                if pad > 0 {
                    m.insert(
                        "pad".to_string(),
                        MetricValue {
                            value: Some(Value::Text("x".repeat(pad.min(250)))),
                        },
                    );
                }
                Telemetry {
                    schema_version: 1,
                    msg_id: msg_id.clone(),
                    ts: Some(Ts::TsMs(ts)),
                    metrics: m,
                    tags: Default::default(),
                }
                .encode_to_vec()
            }
        };
        (device, msg_id, body)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let common = match &cli.mode {
        Mode::Http { common, .. } | Mode::Mqtt { common, .. } => common.clone(),
    };
    let (acked_tx, writer) = match &common.acked {
        Some(path) => {
            let file = match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("loadgen: cannot open {}: {e}", path.display());
                    return std::process::ExitCode::from(2);
                }
            };
            let (tx, rx) = mpsc::channel::<String>();
            let writer = std::thread::spawn(move || write_acked(file, rx));
            (Some(tx), Some(writer))
        }
        None => (None, None),
    };
    let stats = Arc::new(Stats {
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::new()),
        acked_tx,
        stop: AtomicBool::new(false),
    });
    let start = Instant::now();
    let pacer = Arc::new(Pacer {
        start,
        rate: common.rate,
        next: AtomicU64::new(0),
        count: common.count,
        until: common.duration.map(|d| start + d),
    });
    let payloads = Arc::new(Payloads {
        run: common
            .run_id
            .clone()
            .unwrap_or_else(|| chrono::Utc::now().format("%H%M%S%3f").to_string()),
        format: common.format,
        size: common.size,
        devices: common.devices,
        prefix: common.device_prefix.clone(),
        walks: Mutex::default(),
    });
    let result = match &cli.mode {
        Mode::Http {
            url,
            connections,
            token_file,
            ..
        } => run_http(
            url,
            *connections,
            token_file.as_deref(),
            &pacer,
            &payloads,
            &stats,
        ),
        Mode::Mqtt {
            url,
            topic,
            inflight,
            ..
        } => run_mqtt(url, topic, *inflight, &common, &pacer, &payloads, &stats),
    };
    let elapsed = start.elapsed().as_secs_f64();
    let stats = Arc::try_unwrap(stats).ok();
    let (sent, acked, errors, refused, mut lat) = match stats {
        Some(s) => {
            drop(s.acked_tx);
            (
                s.sent.into_inner(),
                s.acked.into_inner(),
                s.errors.into_inner(),
                s.refused.into_inner(),
                s.latencies_us.into_inner().unwrap_or_default(),
            )
        }
        None => (0, 0, 0, 0, Vec::new()),
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "acked": acked,
            "errors": errors,
            "refused": refused,
            "seconds": elapsed,
            "acked_per_s": acked as f64 / elapsed.max(1e-9),
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        })
    );
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

fn write_acked(file: std::fs::File, rx: mpsc::Receiver<String>) {
    let mut w = BufWriter::new(file);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(k) => {
                let _ = writeln!(w, "{k}");
                while let Ok(k) = rx.try_recv() {
                    let _ = writeln!(w, "{k}");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let _ = w.flush();
    }
    let _ = w.flush();
}

// ------------------------------------------------------------------- HTTP

fn run_http(
    url: &str,
    connections: usize,
    token_file: Option<&std::path::Path>,
    pacer: &Arc<Pacer>,
    payloads: &Arc<Payloads>,
    stats: &Arc<Stats>,
) -> Result<(), String> {
    let hostport = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?
        .trim_end_matches('/')
        .to_string();
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let workers: Vec<_> = (0..connections.max(1))
        .map(|_| {
            let (hostport, token, pacer, payloads, stats) = (
                hostport.clone(),
                token.clone(),
                pacer.clone(),
                payloads.clone(),
                stats.clone(),
            );
            std::thread::spawn(move || {
                http_worker(&hostport, token.as_deref(), &pacer, &payloads, &stats)
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn connect(hostport: &str) -> std::io::Result<Conn> {
    let s = TcpStream::connect(hostport)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(Conn {
        reader: BufReader::new(s.try_clone()?),
        writer: s,
    })
}

/// One request and its answer: (status, Retry-After seconds).
fn post(
    conn: &mut Conn,
    hostport: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<(u16, Option<u64>)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    );
    conn.writer.write_all(head.as_bytes())?;
    conn.writer.write_all(body)?;
    let mut line = String::new();
    if conn.reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let (mut len, mut retry) = (0usize, None);
    loop {
        let mut h = String::new();
        if conn.reader.read_line(&mut h)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "retry-after" => retry = v.trim().parse().ok(),
                _ => {}
            }
        }
    }
    let mut sink = vec![0u8; len];
    conn.reader.read_exact(&mut sink)?;
    Ok((status, retry))
}

fn http_worker(
    hostport: &str,
    token: Option<&str>,
    pacer: &Pacer,
    payloads: &Payloads,
    stats: &Stats,
) {
    let mut conn: Option<Conn> = None;
    while let Some(n) = pacer.next(stats) {
        let (device, msg_id, body) = payloads.make(n);
        let path = format!("/ingest/{device}");
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let sent_at = Instant::now();
        // Until an answer says it is stored (or refused for good).
        loop {
            if stats.stop.load(Ordering::Relaxed) {
                return;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect(hostport) {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                },
            };
            match post(c, hostport, &path, token, &body) {
                Ok((200 | 202, _)) => {
                    stats.ack(format!("{device}:{msg_id}"), sent_at);
                    break;
                }
                Ok((429 | 503, retry)) => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(
                        retry.map_or(200, |s| (s * 1000).min(2000)),
                    ));
                }
                Ok((status, _)) => {
                    eprintln!("loadgen: {device}:{msg_id} refused with {status}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

// ------------------------------------------------------------------- MQTT

fn run_mqtt(
    url: &str,
    topic: &str,
    inflight: u16,
    common: &Common,
    pacer: &Arc<Pacer>,
    payloads: &Arc<Payloads>,
    stats: &Arc<Stats>,
) -> Result<(), String> {
    let (host, port) = gateway_actors::mqtt::broker_address(url)
        .map(|(_, h, p)| (h, p))
        .map_err(|e| format!("{url}: {e}"))?;
    let devices = common.devices.max(1);
    // One queue of record numbers per device connection, fed by the pacer.
    let mut queues = Vec::new();
    let mut threads = Vec::new();
    for d in 0..devices {
        let (tx, rx) = mpsc::sync_channel::<u64>(64);
        queues.push(tx);
        let device = payloads.device(d as u64);
        let client_id = format!("loadgen-{}-{device}", payloads.run);
        let mut opts = rumqttc::MqttOptions::new(client_id, host.clone(), port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(false);
        opts.set_inflight(inflight.max(1));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, connection) = rumqttc::Client::new(opts, usize::from(inflight) + 16);
        // Publish order = outgoing order: pkids map to record keys in order.
        let pending: Arc<Mutex<VecDeque<(String, Instant)>>> = Arc::default();
        let by_pkid: Arc<Mutex<HashMap<u16, (String, Instant)>>> = Arc::default();
        {
            let (stats, pending, by_pkid) = (stats.clone(), pending.clone(), by_pkid.clone());
            threads.push(std::thread::spawn(move || {
                mqtt_poll(connection, &stats, &pending, &by_pkid)
            }));
        }
        let (topic, payloads, stats) = (
            topic.replace("{device_id}", &device),
            payloads.clone(),
            stats.clone(),
        );
        threads.push(std::thread::spawn(move || {
            for n in rx {
                let (device, msg_id, body) = payloads.make(n);
                pending
                    .lock()
                    .unwrap()
                    .push_back((format!("{device}:{msg_id}"), Instant::now()));
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if client
                    .publish(&topic, rumqttc::QoS::AtLeastOnce, false, body)
                    .is_err()
                {
                    break;
                }
            }
            // Wait for the last acknowledgements, then leave.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline
                && !(pending.lock().unwrap().is_empty() && by_pkid.lock().unwrap().is_empty())
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = client.disconnect();
        }));
    }
    // The pacer hands record n to the connection of its device.
    while let Some(n) = pacer.next(stats) {
        if queues[(n % devices as u64) as usize].send(n).is_err() {
            break;
        }
    }
    drop(queues);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn mqtt_poll(
    mut connection: rumqttc::Connection,
    stats: &Stats,
    pending: &Mutex<VecDeque<(String, Instant)>>,
    by_pkid: &Mutex<HashMap<u16, (String, Instant)>>,
) {
    use rumqttc::{Event, Outgoing, Packet};
    for ev in connection.iter() {
        match ev {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                // A resend after a reconnect reuses its pkid and is not in `pending`.
                if let Ok(mut b) = by_pkid.lock() {
                    if let std::collections::hash_map::Entry::Vacant(e) = b.entry(pkid) {
                        if let Some(p) = pending.lock().unwrap().pop_front() {
                            e.insert(p);
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some((key, at)) = by_pkid.lock().unwrap().remove(&ack.pkid) {
                    stats.ack(key, at);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
