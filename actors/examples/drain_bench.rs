//! Backlog drain throughput of one sink, for `make bench` (`scripts/bench-sinks.sh`).
//!
//! ```text
//! cargo run --release -p gateway-actors --example drain_bench -- KIND [options]
//!   KIND                file | s3 | kafka | mqtt | http
//!   --records N         backlog size (default 1000000)
//!   --batch N           batch_max_records (default 5000)
//!   --dir DIR           data dir (default ./target/drain-bench-PID, removed afterwards)
//!   --endpoint URL --bucket B     for s3 (credentials from AWS_* env)
//!   --brokers B --topic T         for kafka (the topic must exist)
//!   --broker mqtt://HOST:PORT     for mqtt (records go to bench/{device}/telemetry)
//!   --url http://HOST:PORT/PATH   for http (NDJSON batches are POSTed there)
//!   --out FILE          append a Markdown row to FILE
//! ```
//!
//! Fills a WAL with N canonical records (made by the gateway's own
//! `parse_payload`), then starts `WalStore` (and its `WalWriter`), a
//! `SinkActor` and a `Dispatcher`
//! exactly as the gateway wires them and measures the time until the sink's
//! cursor reaches the head, sampling the process RSS every 100 ms.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Supervisor;
use gateway_actors::dispatcher::{DispatchConfig, Dispatcher};
use gateway_actors::ingest::validate::{parse_payload, Enrichment};
use gateway_actors::ingest::{IngestLimits, Source};
use gateway_actors::sink::http::HttpKeys;
use gateway_actors::sink::kafka::KafkaSinkConfig;
use gateway_actors::sink::mqtt::MqttKeys;
use gateway_actors::sink::s3::S3SinkConfig;
use gateway_actors::sink::{factory, SinkActor, SinkConfig, SinkContext, SinkFactory, SinkTarget};
use gateway_actors::wal::{now_ms, Wal, WalConfig, WalHealth, WalStore, WalWriter};
use gateway_actors::Metrics;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = args.first().cloned().unwrap_or_else(|| {
        eprintln!("usage: drain_bench file|s3|kafka|mqtt|http [--records N] [--batch N] [--endpoint URL --bucket B] [--brokers B --topic T] [--broker mqtt://H:P] [--url http://H:P/P] [--out FILE]");
        std::process::exit(2)
    });
    let records: u64 = arg(&args, "--records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let batch: usize = arg(&args, "--batch")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let dir = arg(&args, "--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("target/drain-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("data dir");

    // 1. The backlog.
    let cfg = WalConfig::new(dir.join("wal.db"), &["bench"]);
    let fill = Instant::now();
    {
        let mut wal = Wal::open(cfg.clone()).expect("open WAL");
        let limits = IngestLimits::default();
        let mut i = 0u64;
        while i < records {
            let n = 1000.min(records - i);
            let mut group = Vec::with_capacity(n as usize);
            for k in i..i + n {
                let payload = format!(
                    r#"{{"msg_id":"{k}","ts":1764057600123,"metrics":{{"t":21.5,"rh":48,"door":false}},"tags":{{"fw":"1.4.2"}}}}"#
                );
                let enrich = Enrichment {
                    gateway_id: "bench",
                    correlation_id: "7d3c1c5e-7f53-4a0e-9d2b-0c1f4c8a9e11",
                    receive_ms: now_ms(),
                    source: Source::Mqtt,
                    idempotency_key: None,
                    traceparent: None,
                    topic_tags: &[],
                    routing: None,
                };
                let device = format!("dev-{}", k % 100);
                group.extend(
                    parse_payload(&device, payload.as_bytes(), &limits, &enrich)
                        .expect("valid payload"),
                );
            }
            wal.append(group).expect("append");
            i += n;
        }
    }
    eprintln!(
        "backlog of {records} records written in {:.1}s",
        fill.elapsed().as_secs_f64()
    );

    // 2. The drain, wired as the gateway wires it.
    let factory: SinkFactory = match kind.as_str() {
        "file" | "s3" => {
            let url = if kind == "file" {
                format!("file://{}", dir.join("archive").display())
            } else {
                format!(
                    "s3://{}/bench",
                    arg(&args, "--bucket").unwrap_or_else(|| "bench".into())
                )
            };
            let c = S3SinkConfig {
                url,
                gateway_id: "bench".into(),
                gzip_level: 1,
                compression: gateway_actors::sink::Compression::Gzip(1),
                endpoint: arg(&args, "--endpoint"),
                region: None,
                path_style: None,
                access_key_id: None,
                secret_access_key: None,
                multipart_threshold_bytes: 8 << 20,
                compact: false,
                max_bytes: None,
                maintenance_interval: std::time::Duration::from_secs(60),
            };
            factory(&SinkTarget::S3(c))
        }
        "kafka" => {
            let c = KafkaSinkConfig {
                brokers: arg(&args, "--brokers").unwrap_or_else(|| "127.0.0.1:9092".into()),
                topic: arg(&args, "--topic").unwrap_or_else(|| "bench".into()),
                compression: "lz4".into(),
                message_timeout: Duration::from_secs(60),
                security_protocol: None,
                ssl_ca_file: None,
                ssl_cert_file: None,
                ssl_key_file: None,
                sasl_mechanism: None,
                sasl_username: None,
                sasl_password: None,
                extra: Default::default(),
            };
            factory(&SinkTarget::Kafka(c))
        }
        "mqtt" | "http" => {
            let (flag, keys) = if kind == "mqtt" {
                let keys = MqttKeys {
                    url: arg(&args, "--broker"),
                    topic_prefix: Some("bench".into()),
                    ..MqttKeys::default()
                };
                ("--broker", SinkConfig::Mqtt(keys))
            } else {
                let keys = HttpKeys {
                    url: arg(&args, "--url"),
                    ..HttpKeys::default()
                };
                ("--url", SinkConfig::Http(keys))
            };
            let ctx = SinkContext {
                name: "bench",
                gateway_id: "bench",
                publish_timeout: Duration::from_secs(120),
            };
            let target = keys.build(&ctx).unwrap_or_else(|e| {
                eprintln!("{flag}: {}", e.message);
                std::process::exit(2)
            });
            factory(&target)
        }
        other => {
            eprintln!("unknown kind {other}");
            std::process::exit(2)
        }
    };
    let sys = actix::System::new();
    let (secs, rss, dead) = sys.block_on(async move {
        let metrics = Metrics::unregistered();
        let health = Arc::new(WalHealth::default());
        let wal = Wal::open(cfg).expect("open WAL");
        let (m, h) = (metrics.clone(), health.clone());
        let store = Supervisor::start(move |_| WalStore::new(wal, m, h));
        let wal = WalWriter::new(store, health);
        let m = metrics.clone();
        let sink = Supervisor::start(move |_| SinkActor::new("bench", factory, m));
        let mut d = DispatchConfig::new("bench");
        d.batch_max_records = batch;
        d.batch_max_wait = Duration::ZERO;
        d.publish_timeout = Duration::from_secs(120);
        let (w, s, m) = (wal.clone(), sink.clone(), metrics.clone());
        let _disp = Supervisor::start(move |_| Dispatcher::new(d, w, s, m));
        let start = Instant::now();
        let mut rss = Vec::new();
        let mut dead;
        loop {
            actix_rt::time::sleep(Duration::from_millis(100)).await;
            rss.push(rss_kb());
            let stats = wal.stats().await.expect("stats");
            dead = stats.sinks["bench"].dead;
            if stats.sinks["bench"].cursor >= stats.head {
                break;
            }
            if start.elapsed() > Duration::from_secs(600) {
                eprintln!("drain did not finish in 10 minutes");
                break;
            }
        }
        (start.elapsed().as_secs_f64(), rss, dead)
    });
    // A drain that dead-letters is not a delivery: refuse to report a rate.
    if dead > 0 {
        eprintln!("{kind}: {dead} records were dead-lettered; the drain failed");
        std::process::exit(1);
    }
    let rate = records as f64 / secs;
    let q = |f: f64| rss[((rss.len() as f64 - 1.0) * f) as usize];
    let row = format!(
        "| {kind} | {records} | {batch} | {secs:.1} | {rate:.0} | {} / {} / {} / {} |",
        q(0.1) / 1024,
        q(0.5) / 1024,
        q(0.9) / 1024,
        rss.iter().max().copied().unwrap_or(0) / 1024
    );
    println!("{row}");
    if let Some(out) = arg(&args, "--out") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
        {
            let _ = writeln!(f, "{row}");
        }
    }
    if arg(&args, "--dir").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
