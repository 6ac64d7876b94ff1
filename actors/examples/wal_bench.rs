//! Durable WAL append throughput, for `make bench` (`scripts/bench.sh`).
//!
//! ```text
//! cargo run --release -p gateway-actors --example wal_bench -- [DATA_DIR] [options]
//!   DATA_DIR            where the databases go (default: ./target/wal-bench-PID, removed afterwards;
//!                       /tmp is avoided because it may be tmpfs, where fsync costs nothing)
//!   --out FILE          append the result table (Markdown) to FILE
//!   --secs S            time bound of each run (default 3)
//!   --max-records N     record bound of each run (default 500000)
//!   --groups LIST       records per commit for the engine runs (default 1,10,100,1000)
//!   --concurrency LIST  appends in flight (`WalWriter::append`) for the actor runs (default 1,16,256)
//!   --keep              keep the databases
//! ```
//!
//! Three measurements, each on a fresh database:
//! 1. fsync baseline: 4 KiB write + `fdatasync` on a plain file (what one commit
//!    costs at least on this disk);
//! 2. engine: `Wal::write(&[WriteOp::Append(N records)])` in a loop, one
//!    transaction and one fsync per call (`synchronous=FULL`); only the time
//!    inside `write` is counted, the records are built before;
//! 3. actor: the `WalStore` actor's writer thread with C concurrent senders
//!    of one-record appends each through its `WalWriter` (the path the
//!    gateway's callers take), so the thread group-commits whatever queued
//!    up during the previous fsync; the group size comes from the
//!    `gateway_wal_group_size` histogram. (The rows keep the name "actor
//!    WalStore" so they compare with earlier results.)
//!
//! Records are real canonical bodies made by the gateway's own
//! `parse_payload` from a device payload like
//! `{"msg_id":"…","ts":…,"metrics":{"t":21.5,"rh":48},"tags":{"fw":"1.4.2"}}`,
//! with a unique idempotency key each.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use gateway_actors::ingest::validate::{parse_payload, Enrichment};
use gateway_actors::ingest::{IngestLimits, Source};
use gateway_actors::wal::{
    NewRecord, Wal, WalConfig, WalHealth, WalStore, WalWriter, WriteOp, WriteResult,
};
use gateway_actors::Metrics;

const DEVICES: u64 = 100;

struct Opts {
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
    secs: f64,
    max_records: u64,
    groups: Vec<usize>,
    concurrency: Vec<usize>,
    keep: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: wal_bench [DATA_DIR] [--out FILE] [--secs S] [--max-records N] [--groups 1,10,100,1000] \
         [--concurrency 1,16,256] [--keep]"
    );
    std::process::exit(2)
}

fn list(v: &str) -> Vec<usize> {
    let l: Vec<usize> = v
        .split(',')
        .map(|x| x.trim().parse().unwrap_or_else(|_| usage()))
        .collect();
    if l.contains(&0) {
        usage()
    }
    l
}

fn parse_args() -> Opts {
    let mut o = Opts {
        dir: None,
        out: None,
        secs: 3.0,
        max_records: 500_000,
        groups: vec![1, 10, 100, 1000],
        concurrency: vec![1, 16, 256],
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--out" => o.out = Some(val().into()),
            "--data-dir" => o.dir = Some(val().into()),
            "--secs" => o.secs = val().parse().unwrap_or_else(|_| usage()),
            "--max-records" => o.max_records = val().parse().unwrap_or_else(|_| usage()),
            "--groups" => o.groups = list(&val()),
            "--concurrency" => o.concurrency = list(&val()),
            "--keep" => o.keep = true,
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => usage(),
            s => o.dir = Some(s.into()),
        }
    }
    o
}

/// File system type, device and mount point holding `dir`, from /proc/self/mountinfo.
fn filesystem_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return "unknown".into();
    };
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source superopts
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < dash + 3 || f.len() < 5 {
            continue;
        }
        let mnt = f[4].replace("\\040", " ");
        if dir.starts_with(&mnt) && best.as_ref().is_none_or(|(l, _)| mnt.len() >= *l) {
            best = Some((
                mnt.len(),
                format!("{} ({} on {})", f[dash + 1], f[dash + 2], mnt),
            ));
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| "unknown".into())
}

/// Record factory: real canonical bodies from the gateway's validator.
struct Gen {
    next: AtomicU64,
    run: u64,
}

impl Gen {
    fn record(&self) -> NewRecord {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let device = format!("sensor-{:03}", i % DEVICES);
        let ts = 1_764_057_600_000 + i as i64;
        let payload = format!(
            r#"{{"msg_id":"{}-{i}","ts":{ts},"metrics":{{"t":{:.1},"rh":{}}},"tags":{{"fw":"1.4.2"}}}}"#,
            self.run,
            15.0 + (i % 200) as f64 / 10.0,
            30 + i % 50
        );
        let corr = format!("{:08x}-0000-4000-8000-{:012x}", self.run as u32, i);
        let enrich = Enrichment {
            gateway_id: "edge-bench",
            correlation_id: &corr,
            receive_ms: gateway_actors::wal::now_ms(),
            source: Source::Http,
            idempotency_key: None,
            traceparent: None,
            topic_tags: &[],
            routing: None,
        };
        let mut v = parse_payload(
            &device,
            payload.as_bytes(),
            &IngestLimits::default(),
            &enrich,
        )
        .expect("the bench payload is valid");
        v.pop().expect("one record")
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    path: String,
    batch: String,
    records: u64,
    commits: u64,
    secs: f64,
    mean_group: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.records as f64 / self.secs.max(1e-9)
    }
}

/// Lower bound of one commit on this disk: overwrite 4 KiB inside a
/// pre-written file and `fdatasync` it (no size change, like SQLite reusing
/// its -wal file after a checkpoint).
fn fsync_baseline(dir: &Path, secs: f64) -> Row {
    const RING: u64 = 16 << 20;
    let path = dir.join("fsync-baseline.bin");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("open baseline file");
    let block = vec![0x5au8; 4096];
    for _ in 0..RING / 4096 {
        f.write_all(&block).expect("write");
    }
    f.sync_all().expect("fsync");
    let mut lat = Vec::new();
    let mut off = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs.min(2.0) && lat.len() < 100_000 {
        let t = Instant::now();
        std::os::unix::fs::FileExt::write_all_at(&f, &block, off).expect("write");
        f.sync_data().expect("fdatasync");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        off = (off + 4096) % RING;
    }
    let total = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort_by(f64::total_cmp);
    Row {
        path: "fsync baseline (4 KiB overwrite + fdatasync)".into(),
        batch: "-".into(),
        records: lat.len() as u64,
        commits: lat.len() as u64,
        secs: total,
        mean_group: 1.0,
        p50_ms: pct(&lat, 50.0),
        p99_ms: pct(&lat, 99.0),
    }
}

fn engine_run(dir: &Path, gen: &Gen, group: usize, o: &Opts) -> Row {
    let db = dir.join(format!("engine-g{group}.db"));
    let mut wal = Wal::open(WalConfig::new(&db, &["archive"])).expect("open WAL");
    // Warm-up: a few commits, not counted (page cache, first checkpoint setup).
    for _ in 0..3 {
        let recs: Vec<NewRecord> = (0..group).map(|_| gen.record()).collect();
        wal.write(&[WriteOp::Append(recs)]).expect("warm-up commit");
    }
    let mut in_write = Duration::ZERO;
    let mut lat = Vec::new();
    let mut records = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < o.secs && records < o.max_records {
        let recs: Vec<NewRecord> = (0..group).map(|_| gen.record()).collect();
        let t = Instant::now();
        let res = wal.write(&[WriteOp::Append(recs)]).expect("commit");
        let d = t.elapsed();
        match res.first() {
            Some(Ok(WriteResult::Appended(out))) => assert_eq!(out.len(), group),
            other => panic!("unexpected write result {other:?}"),
        }
        in_write += d;
        lat.push(d.as_secs_f64() * 1e3);
        records += group as u64;
    }
    drop(wal);
    lat.sort_by(f64::total_cmp);
    Row {
        path: "engine Wal::write".into(),
        batch: format!("{group} rec/commit"),
        records,
        commits: lat.len() as u64,
        secs: in_write.as_secs_f64(),
        mean_group: group as f64,
        p50_ms: pct(&lat, 50.0),
        p99_ms: pct(&lat, 99.0),
    }
}

fn actor_run(dir: &Path, gen: Arc<Gen>, conc: usize, o: &Opts) -> Row {
    let db = dir.join(format!("actor-c{conc}.db"));
    let secs = o.secs;
    let max_records = o.max_records;
    let system = actix::System::new();
    system.block_on(async move {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).expect("metrics");
        let wal = Wal::open(WalConfig::new(&db, &["archive"])).expect("open WAL");
        let health = Arc::new(WalHealth::default());
        let store = WalStore::new(wal, metrics.clone(), health.clone()).start();
        let addr = WalWriter::new(store, health);
        // Warm-up, not counted.
        for _ in 0..3 {
            addr.append(vec![gen.record()]).await.expect("append");
        }
        let (commits0, groups0, sum0) = (
            metrics.wal_commits.get(),
            metrics.wal_group_size.get_sample_count(),
            metrics.wal_group_size.get_sample_sum(),
        );
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let mut tasks = Vec::with_capacity(conc);
        for _ in 0..conc {
            let (addr, gen, done) = (addr.clone(), gen.clone(), done.clone());
            tasks.push(actix_rt::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline && done.load(Ordering::Relaxed) < max_records {
                    let rec = gen.record();
                    let t = Instant::now();
                    let out = addr.append(vec![rec]).await.expect("append");
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(out.len(), 1);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("sender task"));
        }
        let elapsed = start.elapsed().as_secs_f64();
        let commits = metrics.wal_commits.get() - commits0;
        let groups = metrics.wal_group_size.get_sample_count() - groups0;
        let sum = metrics.wal_group_size.get_sample_sum() - sum0;
        lat.sort_by(f64::total_cmp);
        actix::System::current().stop();
        Row {
            path: "actor WalStore".into(),
            batch: format!("{conc} senders x 1 rec"),
            records: done.load(Ordering::Relaxed),
            commits,
            secs: elapsed,
            mean_group: if groups > 0 { sum / groups as f64 } else { 0.0 },
            p50_ms: pct(&lat, 50.0),
            p99_ms: pct(&lat, 99.0),
        }
    })
}

fn main() {
    let o = parse_args();
    let (dir, temp) = match &o.dir {
        Some(d) => (d.clone(), false),
        None => (
            PathBuf::from("target").join(format!("wal-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let fs = filesystem_of(&dir);
    let gen = Arc::new(Gen {
        next: AtomicU64::new(0),
        run: std::process::id() as u64 * 1_000_003 + gen_seed(),
    });
    let sample = gen.record();
    let mut header = String::new();
    header.push_str(&format!(
        "WAL bench: data dir {} on {fs}; {} CPUs; record body {} bytes (canonical JSON), e.g.\n  {}\n",
        dir.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        sample.body.len(),
        sample.body
    ));
    if fs.starts_with("tmpfs") || fs.starts_with("ramfs") {
        header.push_str("WARNING: the data dir is in memory (tmpfs): fsync is free there, these numbers are not durable-disk numbers\n");
    }
    eprint!("{header}");

    let mut rows = Vec::new();
    eprintln!("fsync baseline ...");
    rows.push(fsync_baseline(&dir, o.secs));
    for &g in &o.groups {
        eprintln!("engine, {g} records per commit ...");
        rows.push(engine_run(&dir, &gen, g, &o));
    }
    for &c in &o.concurrency {
        eprintln!("actor, {c} concurrent senders ...");
        rows.push(actor_run(&dir, gen.clone(), c, &o));
    }

    let mut table = String::new();
    table.push_str(&format!(
        "### WAL appends (durable, synchronous=FULL)\n\nData dir file system: {fs}. Record body: {} bytes. Each run ≤ {} s or ≤ {} records.\n\n",
        sample.body.len(),
        o.secs,
        o.max_records
    ));
    table.push_str("| path | batching | records | commits (fsyncs) | commits/s | records/s | mean group | p50 ms | p99 ms |\n");
    table.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.3} | {:.3} |\n",
            r.path,
            r.batch,
            r.records,
            r.commits,
            r.commits as f64 / r.secs.max(1e-9),
            r.rate(),
            r.mean_group,
            r.p50_ms,
            r.p99_ms
        ));
    }
    table.push_str(
        "\nEngine rows: time inside `Wal::write` only, latency = one commit. Actor rows: wall time, latency = one \
         `WalWriter::append` round trip, mean group = records per commit from `gateway_wal_group_size`.\n",
    );
    println!("{table}");
    if let Some(out) = &o.out {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", out.display()));
        f.write_all(format!("\n{table}").as_bytes())
            .expect("write --out file");
    }
    // Machine-readable summary for scripts.
    for r in &rows {
        println!(
            "RESULT path=\"{}\" batch=\"{}\" records_per_s={:.0} mean_group={:.1}",
            r.path,
            r.batch,
            r.rate(),
            r.mean_group
        );
    }

    if !o.keep {
        for r in ["engine-g", "actor-c"] {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(r) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        if temp {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn gen_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        % 1_000_000_007
}
