//! What the WAL engine writes to disk per record in its steady state: a WAL
//! that already holds a retention period of records, deleting one past
//! retention for each it appends, on a virtual clock (a day of the seed's
//! site is filled in a few minutes, not a day). For `make bench`
//! (`scripts/bench.sh`, section "WAL steady state").
//!
//! ```text
//! cargo run --profile dist -p gateway-actors --example wal_steady -- [DATA_DIR] [options]
//!   DATA_DIR            where the database goes (default: ./target/wal-steady-PID, removed
//!                       afterwards; not /tmp, which may be tmpfs)
//!   --rate R            records a (virtual) second (default 40: the seed's site)
//!   --retention-hours H wal.retention and wal.dedup_window (default 24)
//!   --fill-hours F      hours of records in the WAL before measuring (default: H)
//!   --records N         records appended while measuring (default 100000)
//!   --group G           records per commit while measuring (default 2: the
//!                       gateway's group commit at 40 records/s)
//!   --out FILE          append the result (Markdown) to FILE
//!   --keep              keep the database
//! ```
//!
//! The engine is driven as the writer thread drives it (`Wal::write` of G
//! appends and the sink's acknowledgement, housekeeping every 500 ms of the
//! clock: compaction and a step of the dedup index's sweep, a checkpoint
//! every 10 s), on one thread, without the actors: the figure is the
//! engine's own. Bytes are `/proc/self/io` `write_bytes` over the measured
//! appends; the sweep, which runs once half a WAL's worth of records were
//! deleted (~12 h at 40/s), is run whole at the end and counted per record
//! of that half (`sweep per record`).
//!
//! Keys are `sensor-NNN:{run}-{i}` with `i` counting across devices: each
//! device's keys spread inside its range of the index, as random message
//! ids or payload-hash keys do.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gateway_actors::ingest::validate::{parse_payload, Enrichment};
use gateway_actors::ingest::{IngestLimits, Source};
use gateway_actors::wal::{NewRecord, Wal, WalConfig, WriteOp};

const DEVICES: u64 = 200;
const HOUSEKEEPING_MS: i64 = 500;
const CHECKPOINT_MS: i64 = 10_000;
const COMPACT_CHUNK: usize = 5000;

struct Opts {
    dir: Option<PathBuf>,
    rate: f64,
    retention_hours: f64,
    fill_hours: Option<f64>,
    records: u64,
    group: u64,
    out: Option<PathBuf>,
    keep: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: wal_steady [DATA_DIR] [--rate R] [--retention-hours H] [--fill-hours F] \
         [--records N] [--group G] [--out FILE] [--keep]"
    );
    std::process::exit(2)
}

fn opts() -> Opts {
    let mut o = Opts {
        dir: None,
        rate: 40.0,
        retention_hours: 24.0,
        fill_hours: None,
        records: 100_000,
        group: 2,
        out: None,
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--rate" => o.rate = val().parse().unwrap_or_else(|_| usage()),
            "--retention-hours" => o.retention_hours = val().parse().unwrap_or_else(|_| usage()),
            "--fill-hours" => o.fill_hours = Some(val().parse().unwrap_or_else(|_| usage())),
            "--records" => o.records = val().parse().unwrap_or_else(|_| usage()),
            "--group" => o.group = val().parse().unwrap_or_else(|_| usage()),
            "--out" => o.out = Some(val().into()),
            "--keep" => o.keep = true,
            s if s.starts_with("--") => usage(),
            s => o.dir = Some(s.into()),
        }
    }
    if o.rate <= 0.0 || o.group == 0 || o.records == 0 {
        usage()
    }
    o
}

/// `write_bytes` of this process so far (`/proc/self/io`).
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes in /proc/self/io")
}

/// Record `i`, received at `ms`: made by the gateway's own `parse_payload`
/// from a device payload, as `wal_bench`'s are.
fn record(run: u64, i: u64, ms: i64) -> NewRecord {
    let device = format!("sensor-{:03}", i % DEVICES);
    let payload = format!(
        r#"{{"msg_id":"{run}-{i}","ts":{ms},"metrics":{{"t":{:.1},"rh":{}}},"tags":{{"fw":"1.4.2"}}}}"#,
        15.0 + (i % 200) as f64 / 10.0,
        30 + i % 50
    );
    let corr = format!("{run:08x}-0000-4000-8000-{i:012x}");
    let enrich = Enrichment {
        gateway_id: "edge-bench",
        correlation_id: &corr,
        receive_ms: ms,
        source: Source::Http,
        idempotency_key: None,
        traceparent: None,
        topic_tags: &[],
        routing: None,
    };
    parse_payload(
        &device,
        payload.as_bytes(),
        &IngestLimits::default(),
        &enrich,
    )
    .expect("the bench payload is valid")
    .pop()
    .expect("one record")
}

fn main() {
    let o = opts();
    let own_dir = o.dir.is_none();
    let dir = o
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("target/wal-steady-{}", std::process::id())));
    std::fs::create_dir_all(&dir).expect("data dir");
    let path = dir.join("wal.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let retention = Duration::from_secs_f64(o.retention_hours * 3600.0);
    let mut cfg = WalConfig::new(path.clone(), &["a"]);
    cfg.retention = retention;
    cfg.dedup_window = retention;
    cfg.min_free_disk_bytes = 0;
    let mut wal = Wal::open(cfg).expect("open the WAL");
    wal.defer_auto_checkpoint().expect("auto checkpoint");
    let run = std::process::id() as u64;
    let step_ms = 1000.0 / o.rate;
    let fill = ((o.fill_hours.unwrap_or(o.retention_hours) * 3600.0) * o.rate) as u64;
    // The clock: record i is received at t0 + i / rate; the fill's records
    // end where the measured ones start, a retention period after the first.
    let t0 = gateway_actors::wal::now_ms() - (fill as f64 * step_ms) as i64;
    let at = |i: u64| t0 + (i as f64 * step_ms) as i64;

    let started = Instant::now();
    let mut i = 0u64;
    // The fill: in big groups (its cost is not measured), acknowledged.
    while i < fill {
        let n = (fill - i).min(2000);
        let recs: Vec<NewRecord> = (i..i + n).map(|k| record(run, k, at(k))).collect();
        wal.append(recs).expect("append");
        wal.ack("a", &[(i + 1, i + n)]).expect("ack");
        i += n;
        if (i / 2000) % 50 == 0 {
            wal.checkpoint().expect("checkpoint");
        }
    }
    wal.checkpoint().expect("checkpoint");
    let fill_secs = started.elapsed().as_secs_f64();

    // The measured records: G a commit, acknowledged in the next one (as a
    // sink's acknowledgement shares an append's commit), housekeeping and
    // checkpoints on the clock.
    let before = written();
    let (mut next_housekeeping, mut next_checkpoint) = (at(i), at(i));
    let (mut compacted, mut swept_steps) = (0u64, 0u64);
    let end = i + o.records;
    let measured = Instant::now();
    while i < end {
        let n = (end - i).min(o.group);
        let recs: Vec<NewRecord> = (i..i + n).map(|k| record(run, k, at(k))).collect();
        let ops = [
            WriteOp::Append(recs),
            WriteOp::Ack {
                sink: "a".into(),
                ranges: if i > 0 {
                    vec![(i.saturating_sub(o.group) + 1, i)]
                } else {
                    Vec::new()
                },
                reduce: Vec::new(),
            },
        ];
        wal.write(&ops).expect("write");
        i += n;
        let now = at(i);
        if now >= next_housekeeping {
            next_housekeeping = now + HOUSEKEEPING_MS;
            compacted += wal.compact(now, COMPACT_CHUNK).expect("compact").0;
            swept_steps += u64::from(wal.sweep_keys_step().expect("sweep") > 0);
        }
        if now >= next_checkpoint {
            next_checkpoint = now + CHECKPOINT_MS;
            wal.checkpoint().expect("checkpoint");
        }
    }
    wal.checkpoint().expect("checkpoint");
    let measured_secs = measured.elapsed().as_secs_f64();
    let bytes = written() - before;

    // The sweep, whole, and what it costs per record of the half WAL of
    // deletions that starts one.
    let before_sweep = written();
    let sweep_started = Instant::now();
    let swept = wal.sweep_keys().expect("sweep");
    let sweep_secs = sweep_started.elapsed().as_secs_f64();
    wal.checkpoint().expect("checkpoint");
    let sweep_bytes = written() - before_sweep;
    let stats = wal.stats().expect("stats");
    let per_sweep = (stats.stored_records / 2).max(65_536);

    let per_record = bytes as f64 / o.records as f64;
    let sweep_per_record = sweep_bytes as f64 / per_sweep as f64;
    let line = format!(
        "| {:.0}/s | {:.1} h ({fill} records) | {} records, {} a commit | {compacted} | {per_record:.0} B \
         | {sweep_per_record:.0} B ({swept} rows, {:.1} MB in {sweep_secs:.1} s, per {per_sweep} deleted) | {:.0} B |",
        o.rate,
        o.fill_hours.unwrap_or(o.retention_hours),
        o.records,
        o.group,
        sweep_bytes as f64 / 1e6,
        per_record + sweep_per_record,
    );
    println!("{line}");
    println!(
        "RESULT rate={} fill={fill} records={} bytes_per_record={per_record:.0} sweep_per_record={:.0} fill_secs={fill_secs:.0} measured_secs={measured_secs:.0} sweep_secs={sweep_secs:.1} sweep_steps_during={swept_steps}",
        o.rate,
        o.records,
        sweep_per_record
    );
    if let Some(out) = &o.out {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .expect("--out");
        writeln!(f, "{line}").expect("--out");
    }
    drop(wal);
    if own_dir && !o.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
