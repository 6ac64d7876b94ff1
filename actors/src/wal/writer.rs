//! The WAL's writer thread: the one thread that runs the [`Wal`] engine.
//!
//! It takes requests from one queue ([`Request`]: every caller's, queued
//! through a [`super::WalWriter`]; the `WalStore` actor only starts it),
//! group-commits every write waiting in it (one transaction, one fsync),
//! waiting a short while for more appends when that pays ([`CommitWindow`],
//! `wal.commit_window`), answers each, serves the reads between commits,
//! stores acknowledgements held in memory once `wal.ack_flush` has passed,
//! and runs housekeeping (space, stats, compaction). Two more threads, each
//! on a connection of its own: one counts the backlog per sink and class,
//! the other checkpoints ([`super::checkpoint`]).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::checkpoint::Checkpointer;
use super::engine::{now_ms, Wal, WalStats, WriteOp, WriteResult};
use super::error::WalError;
use super::queue::{Request, WalHealth};
use super::space::COMPACT_CHUNK;
use super::stats::{class_stats_on, ClassStatsQuery};
use crate::metrics::Metrics;
use crate::repeats::{self, Kind};
use crate::route::Class;

/// How often the writer thread refreshes space, stats and compaction.
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(500);
/// Housekeeping passes between two counts of the backlog per class (5 s).
const CLASS_STATS_EVERY: u64 = 10;
/// Upper bound of requests taken into one group commit.
const MAX_GROUP_REQUESTS: usize = 4096;
/// With `wal.commit_window`, a group commit stops waiting for more appends
/// once it holds this many records (about 11 KB of typical records: the
/// block a commit leaves partly written is then a small share of it). It
/// bounds the wait at high rates, where the window is not needed to gather
/// a group: at 1k records/s 28 records take 28 ms. Measured with five
/// sinks at 1k/s (the MQTT sink's share acknowledged within 50 ms of
/// receipt; bytes written a record over MQTT): 32 gave 97-98 %; 24 gave
/// 99.8 % and 1.52 KB; 28 gives 99.6 % and 1.46 KB (with the writer
/// sleeping through its window; before that 24-25 gave 99.1-99.2 %).
const GROUP_FULL: usize = 28;

pub(super) fn writer_loop(
    mut wal: Wal,
    rx: mpsc::Receiver<Request>,
    metrics: Metrics,
    health: Arc<WalHealth>,
) {
    health.alive.store(true, Ordering::SeqCst);
    health.writable.store(true, Ordering::SeqCst);
    let mut last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
    let mut passes = 0u64;
    // The last group commit failed because the disk was full.
    let mut failed_full = false;
    let scanner = spawn_class_scanner(wal.config().path.clone(), metrics.clone());
    // Checkpoints leave the commits' way: the checkpointer's thread runs them.
    let checkpointer = match wal.defer_auto_checkpoint() {
        Ok(()) => {
            let cfg = wal.config();
            Checkpointer::spawn(cfg.path.clone(), cfg.checkpoint_every, health.clone())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand the WAL's checkpoints to their own thread; they stay in the commits");
            None
        }
    };
    let mut window = CommitWindow::new(wal.config().commit_window);
    // Acks change the state in memory and are stored later (`ack_flush`).
    let lazy_acks = !wal.config().ack_flush.is_zero();
    publish_stats(&wal, &metrics, &health);
    loop {
        // Wake for housekeeping, or when acknowledgements held in memory are
        // due to be stored (`wal.ack_flush`).
        let wait = wal.acks_due_in().map_or(HOUSEKEEPING_EVERY, |d| {
            d.clamp(Duration::from_millis(10), HOUSEKEEPING_EVERY)
        });
        let first = match rx.recv_timeout(wait) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        // Appends may wait for others to share their commit (`CommitWindow`).
        let mut window_end: Option<Instant> = None;
        let (mut records, mut appends) = (0, 0);
        let mut next = first;
        while let Some(r) = next {
            // While a group waits out its window, what a dispatcher asks for
            // is answered at once: its fetches, releases and acks (held in
            // memory) would otherwise wait for the window and the commit,
            // twice a batch (a sink's receive -> ack p99 was ~125 ms at 1k
            // records/s with a 30 ms window).
            let waiting = window_end.is_some();
            match r {
                Request::Write(op @ WriteOp::Ack { .. }, t, tx) if waiting && lazy_acks => {
                    if let Some(full) = commit_group(&mut wal, vec![(op, t, tx)], &metrics, &health)
                    {
                        failed_full = full;
                    }
                }
                r @ (Request::Fetch(..)
                | Request::Release(..)
                | Request::ReleaseSink(..)
                | Request::Stats(..))
                    if waiting =>
                {
                    serve_read(&mut wal, r)
                }
                Request::Write(op, t, tx) => {
                    if let WriteOp::Append(r) = &op {
                        records += r.len();
                        appends += 1;
                        window.arrived(t);
                        if window_end.is_none() {
                            window_end = window.deadline(t);
                        }
                    }
                    writes.push((op, t, tx));
                }
                other => reads.push(other),
            }
            if writes.len() + reads.len() >= MAX_GROUP_REQUESTS {
                break;
            }
            next = match (rx.try_recv(), window_end) {
                (Ok(r), _) => Some(r),
                (Err(_), Some(end)) if records < GROUP_FULL => window.next(&rx, records, end),
                (Err(_), _) => None,
            };
        }
        if window_end.is_some() {
            window.waited(appends, Instant::now());
        }
        if !writes.is_empty() {
            if let Some(full) = commit_group(&mut wal, writes, &metrics, &health) {
                failed_full = full;
            }
        }
        if wal.acks_due() {
            flush_acks(&mut wal);
        }
        for r in reads {
            serve_read(&mut wal, r);
        }
        if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
            last_housekeeping = Instant::now();
            housekeeping(&mut wal, &metrics, &health);
            if failed_full && room_again(&wal, &health) {
                failed_full = false;
            }
            passes += 1;
            if passes % CLASS_STATS_EVERY == 0 {
                if let Some(scanner) = &scanner {
                    // Full while a scan is still running: skip this round.
                    let _ = scanner.try_send(wal.class_stats_query());
                }
            }
        }
    }
    flush_acks(&mut wal);
    drop(checkpointer);
    health.alive.store(false, Ordering::SeqCst);
    tracing::info!("WAL writer stopped");
}

/// Stores the acknowledgements held in memory; a failure leaves them there
/// for the next commit (the records would only be delivered again).
fn flush_acks(wal: &mut Wal) {
    if let Err(e) = wal.flush_acks() {
        if repeats::admit(Kind::WalCommit, "") {
            tracing::warn!(error = %e, "storing sink acknowledgements failed; kept in memory");
        }
    }
}

/// When a group commit waits for more appends (`wal.commit_window`): every
/// commit writes whole pages and ends a partly written block, so records
/// that share a commit cost less disk each. It waits only
/// - while appends arrive faster than the window (their average gap is
///   shorter): at a slow steady rate nothing would come in time;
/// - while waiting pays: when the last wait gathered no other append (one
///   sender waiting for each answer before it sends again, say) it does not
///   wait again for PROBE_EVERY;
/// - and until the group holds GROUP_FULL records.
struct CommitWindow {
    window: Duration,
    /// When the last append was submitted.
    last: Option<Instant>,
    /// The average gap between appends (exponentially weighted, 1/8).
    gap: Duration,
    /// When a wait last gathered no other append.
    unpaid: Option<Instant>,
}

impl CommitWindow {
    /// Gaps longer than this count as this (an idle spell is not averaged in whole).
    const MAX_GAP: Duration = Duration::from_secs(1);
    /// After a wait that gathered nothing, how long until the next try.
    const PROBE_EVERY: Duration = Duration::from_secs(1);
    /// The shortest sleep while a group waits for more appends.
    const MIN_NAP: Duration = Duration::from_micros(200);

    fn new(window: Duration) -> Self {
        Self {
            window,
            last: None,
            gap: Self::MAX_GAP,
            unpaid: None,
        }
    }

    /// A group that waited ended with `appends` append requests in it.
    fn waited(&mut self, appends: usize, now: Instant) {
        self.unpaid = (appends <= 1).then_some(now);
    }

    /// The group's next request, once it holds `records` records: waits
    /// until `end` at most. It sleeps until the group would be full at the
    /// average gap (or until `end`) instead of waking for each append on
    /// the way (at 40 records/s that was one wake-up of this thread a
    /// record); a request that must not wait for the window unparks it
    /// ([`Request::wakes_writer`]).
    fn next(&self, rx: &mpsc::Receiver<Request>, records: usize, end: Instant) -> Option<Request> {
        loop {
            let left = end
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())?;
            let full = self
                .gap
                .saturating_mul(GROUP_FULL.saturating_sub(records) as u32);
            std::thread::park_timeout(full.max(Self::MIN_NAP).min(left));
            match rx.try_recv() {
                Ok(r) => return Some(r),
                Err(mpsc::TryRecvError::Disconnected) => return None,
                Err(mpsc::TryRecvError::Empty) => {}
            }
        }
    }

    /// An append submitted at `t`.
    fn arrived(&mut self, t: Instant) {
        if let Some(last) = self.last {
            let gap = t.saturating_duration_since(last).min(Self::MAX_GAP);
            self.gap = (self.gap * 7 + gap) / 8;
        }
        self.last = Some(self.last.map_or(t, |l| l.max(t)));
    }

    /// Until when a group whose first append was submitted at `first` may
    /// wait for more (`None`: commit at once).
    fn deadline(&self, first: Instant) -> Option<Instant> {
        let pays = self
            .unpaid
            .is_none_or(|t| first.saturating_duration_since(t) >= Self::PROBE_EVERY);
        (!self.window.is_zero() && self.gap < self.window && pays).then(|| first + self.window)
    }
}

type WriteReply = oneshot::Sender<Result<WriteResult, WalError>>;

/// Free disk space that makes a WAL whose commit failed on a full disk
/// writable again (or `wal.min_free_disk_bytes`, when larger): room for
/// the largest group commit of small records.
const ROOM_AGAIN_BYTES: u64 = 4 << 20;

/// After a commit failed on a full disk: the disk has room again, so the
/// WAL counts as writable (`/readyz` 200) before any append proves it.
/// Without this, a gateway behind a load balancer that stops sending to a
/// 503 `/readyz` would wait for an append that never comes. If the next
/// append still fails, it is unwritable again.
fn room_again(wal: &Wal, health: &WalHealth) -> bool {
    let free = wal.disk_free;
    if free < ROOM_AGAIN_BYTES.max(wal.config().min_free_disk_bytes) {
        return false;
    }
    mark_writable(wal, health, "its disk has room");
    true
}

/// The WAL takes appends again: `/readyz` stops naming the storage error.
fn mark_writable(wal: &Wal, health: &WalHealth, why: &str) {
    if !health.writable.swap(true, Ordering::SeqCst) {
        tracing::info!(disk_free_bytes = wal.disk_free, why, "WAL writable again");
        health.set_problem(wal.backpressure().map(str::to_string));
    }
}

/// Commits `writes` as one transaction and answers each. `None`: it
/// committed; `Some(disk_full)`: it failed, and whether the disk was full.
fn commit_group(
    wal: &mut Wal,
    writes: Vec<(WriteOp, Instant, WriteReply)>,
    metrics: &Metrics,
    health: &WalHealth,
) -> Option<bool> {
    let oldest = writes
        .iter()
        .map(|(_, t, _)| *t)
        .min()
        .unwrap_or_else(Instant::now);
    let (ops, replies): (Vec<WriteOp>, Vec<(Instant, WriteReply)>) =
        writes.into_iter().map(|(op, t, tx)| (op, (t, tx))).unzip();
    let appended: usize = ops
        .iter()
        .map(|op| match op {
            WriteOp::Append(r) => r.len(),
            _ => 0,
        })
        .sum();
    let changes_before = wal.total_changes();
    match wal.write(&ops) {
        Ok(results) => {
            // Acks held in memory (`ack_flush`) make commits that write nothing.
            if wal.total_changes() > changes_before {
                metrics.wal_commits.inc();
            }
            if appended > 0 {
                metrics.wal_group_size.observe(appended as f64);
                metrics
                    .wal_append_seconds
                    .observe(oldest.elapsed().as_secs_f64());
            }
            // Only a commit that stored records shows that appends fit again:
            // an ack or a dead-letter write may fit in space a record does
            // not (on a full disk, /readyz flipped back to 200 while every
            // append still failed).
            if appended > 0 {
                mark_writable(wal, health, "records were stored");
            }
            for (res, (_, tx)) in results.into_iter().zip(replies) {
                let _ = tx.send(res);
            }
            if appended > 0 {
                health.appended.send_replace(wal.head());
            }
            None
        }
        Err(e) => {
            if repeats::admit(Kind::WalCommit, "") {
                tracing::error!(error = %e, ops = ops.len(), "WAL group commit failed; nothing of it was stored");
            }
            health.writable.store(false, Ordering::SeqCst);
            health.set_problem(Some(e.to_string()));
            for (_, tx) in replies {
                let _ = tx.send(Err(WalError::Unavailable(e.to_string())));
            }
            Some(matches!(
                &e,
                WalError::Storage(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == rusqlite::ErrorCode::DiskFull
            ))
        }
    }
}

fn serve_read(wal: &mut Wal, r: Request) {
    match r {
        Request::Fetch(f, tx) => {
            let _ = tx.send(wal.fetch_or_wait(&f.sink, f.max_records, f.max_wait));
        }
        Request::Release(rel, tx) => {
            let _ = tx.send(wal.release(&rel.sink, &rel.ranges));
        }
        Request::ReleaseSink(sink, tx) => {
            let _ = tx.send(wal.release_all(&sink));
        }
        Request::Stats(tx) => {
            let _ = tx.send(wal.stats());
        }
        Request::Exec(f) => f(wal),
        Request::Write(..) => {}
        #[cfg(feature = "fault-injection")]
        Request::Panic => panic!("injected WAL writer failure"),
    }
}

fn housekeeping(wal: &mut Wal, metrics: &Metrics, health: &WalHealth) {
    match wal.expire(now_ms()) {
        Ok(expired) => {
            for (sink, class, n) in expired {
                metrics
                    .wal_expired
                    .with_label_values(&[&sink, class.as_str()])
                    .inc_by(n);
                tracing::warn!(sink = %sink, class = %class, records = n,
                    "records outlived their TTL for this sink: now its dead letters (reason expired)");
            }
        }
        Err(e) => tracing::warn!(error = %e, "TTL expiry failed"),
    }
    match wal.compact(now_ms(), COMPACT_CHUNK) {
        Ok((compacted, dropped)) => {
            if compacted > 0 {
                metrics.wal_compacted.inc_by(compacted);
                tracing::debug!(
                    compacted,
                    "WAL compacted delivered records (past retention, or making room)"
                );
            }
            if dropped > 0 {
                metrics.wal_dropped.inc_by(dropped);
                tracing::warn!(
                    dropped,
                    "WAL over wal.max_bytes: dropped the oldest records (policy drop_oldest)"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "WAL compaction failed");
            // A successful compaction leaves the size fresh; this one may not have.
            if let Err(e) = wal.refresh_space() {
                tracing::warn!(error = %e, "cannot read WAL size");
            }
        }
    }
    if let Err(e) = wal.sweep_keys_step() {
        tracing::warn!(error = %e, "sweeping the WAL's dedup index failed");
    }
    if let Err(e) = wal.merge_keys_if_idle() {
        tracing::warn!(error = %e, "merging the WAL's dedup keys failed");
    }
    let was = health.backpressure.load(Ordering::SeqCst);
    let now = wal.backpressure().map(str::to_string);
    if now.is_some() != was && repeats::admit(Kind::WalBackpressure, "") {
        match &now {
            Some(why) => tracing::warn!(reason = %why, "backpressure on: refusing ingest"),
            None => tracing::info!("backpressure off: accepting ingest"),
        }
    }
    health.backpressure.store(now.is_some(), Ordering::SeqCst);
    if health.writable.load(Ordering::SeqCst) {
        health.set_problem(now);
    }
    publish_stats(wal, metrics, health);
}

fn publish_stats(wal: &Wal, metrics: &Metrics, health: &WalHealth) {
    let Ok(stats) = wal.stats() else { return };
    metrics.wal_bytes.set(stats.live_bytes as i64);
    metrics
        .wal_disk_free_bytes
        .set(stats.disk_free_bytes.min(i64::MAX as u64) as i64);
    metrics.wal_stored_records.set(stats.stored_records as i64);
    metrics.backpressure_active.set(stats.backpressure as i64);
    health
        .backpressure
        .store(stats.backpressure, Ordering::SeqCst);
    let now = now_ms();
    let estimate = |n: u64| WalStats::estimate_bytes(stats.live_bytes, stats.stored_records, n);
    for (sink, s) in &stats.sinks {
        for (state, n) in [
            ("enqueued", s.enqueued),
            ("inflight", s.inflight),
            ("dead", s.dead),
        ] {
            metrics
                .wal_pending_bytes
                .with_label_values(&[sink, state])
                .set(estimate(n).min(i64::MAX as u64) as i64);
        }
        metrics
            .wal_records
            .with_label_values(&[sink, "enqueued"])
            .set(s.enqueued as i64);
        metrics
            .wal_records
            .with_label_values(&[sink, "inflight"])
            .set(s.inflight as i64);
        metrics
            .wal_records
            .with_label_values(&[sink, "dead"])
            .set(s.dead as i64);
        let age = s.oldest_pending_ms.map_or(0, |ms| (now - ms).max(0) / 1000);
        metrics
            .wal_oldest_pending_age
            .with_label_values(&[sink])
            .set(age);
    }
}

/// The thread that counts the backlog per sink and class
/// ([`class_stats_on`]: a scan of the backlog, seconds for a million
/// records) on a read-only connection of its own, so that the scan never
/// holds up the writer. It takes the writer's snapshots one at a time and
/// ends with the writer (when the sender is dropped).
fn spawn_class_scanner(
    path: std::path::PathBuf,
    metrics: Metrics,
) -> Option<mpsc::SyncSender<ClassStatsQuery>> {
    let (tx, rx) = mpsc::sync_channel::<ClassStatsQuery>(1);
    let spawned = std::thread::Builder::new()
        .name("wal-stats".into())
        .spawn(move || {
            let mut conn = None;
            while let Ok(q) = rx.recv() {
                if conn.is_none() {
                    match open_query_only(&path) {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot open the WAL to count the backlog per class");
                            continue;
                        }
                    }
                }
                if let Some(c) = &conn {
                    publish_class_stats(c, &q, &metrics);
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "cannot spawn the WAL stats thread; per-class backlog metrics stay at 0");
            None
        }
    }
}

/// A connection of its own that reads the WAL and never writes it (set up
/// as the read pool's).
fn open_query_only(path: &std::path::Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let c = rusqlite::Connection::open_with_flags(path, super::reader::QUERY_ONLY_FLAGS)?;
    super::reader::make_query_only(&c)?;
    Ok(c)
}

/// Per sink and class: the backlog and the age of its oldest record.
fn publish_class_stats(conn: &rusqlite::Connection, q: &ClassStatsQuery, metrics: &Metrics) {
    let stats = match class_stats_on(conn, q) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the backlog per class");
            return;
        }
    };
    let now = now_ms();
    for (sink, per) in &stats {
        for class in Class::ALL {
            let (n, oldest) = per[class as usize];
            let labels = [sink.as_str(), class.as_str()];
            // Present from the start (0), so rates and alerts have a series.
            metrics.wal_expired.with_label_values(&labels);
            metrics
                .wal_class_records
                .with_label_values(&labels)
                .set(n.min(i64::MAX as u64) as i64);
            metrics
                .wal_class_oldest_age
                .with_label_values(&labels)
                .set(oldest.map_or(0, |ms| (now - ms).max(0) / 1000));
        }
    }
}

#[cfg(test)]
mod tests {
    use actix::prelude::*;

    use super::super::engine::{Fetched, NewRecord, WalConfig};
    use super::super::handle::WalWriter;
    use super::super::store::WalStore;
    use super::*;

    /// A started `WalStore` on `wal` and its handle.
    fn start(wal: Wal) -> WalWriter {
        let health = Arc::new(WalHealth::default());
        let store = WalStore::new(wal, Metrics::unregistered(), health.clone()).start();
        WalWriter::new(store, health)
    }

    /// Record `d:{i}` of device "d"; `more` goes into its body after the key.
    fn record(i: u32, more: &str) -> NewRecord {
        NewRecord {
            idempotency_key: format!("d:{i}"),
            correlation_id: format!("c{i}"),
            device_id: "d".into(),
            receive_ms: now_ms(),
            body: format!(r#"{{"idempotency_key":"d:{i}"{more}}}"#),
            route: Default::default(),
        }
    }

    /// A writer on a fresh WAL with one sink "a" holding acks `ack_flush`,
    /// one record appended, fetched and acked; and the stored cursor of "a",
    /// read through a connection of its own.
    async fn acked_one(
        dir: &std::path::Path,
        ack_flush: Duration,
    ) -> (WalWriter, impl Fn() -> u64) {
        let mut cfg = WalConfig::new(dir.join("w.db"), &["a"]);
        cfg.ack_flush = ack_flush;
        let store = start(Wal::open(cfg).unwrap());
        store
            .with(|w| {
                w.append(vec![record(1, "")])?;
                let batch = w.fetch("a", 10, Duration::ZERO)?.expect("the record");
                w.ack("a", &batch.ranges)
            })
            .await
            .unwrap();
        let path = dir.join("w.db");
        let cursor = move || -> u64 {
            rusqlite::Connection::open(&path)
                .unwrap()
                .query_row("SELECT cursor FROM sinks WHERE name = 'a'", [], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        (store, cursor)
    }

    #[test]
    fn the_checkpointer_keeps_the_wal_file_bounded_under_steady_appends() {
        let sys = actix::System::new();
        sys.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = WalConfig::new(dir.path().join("w.db"), &["a"]);
            cfg.checkpoint_every = Duration::from_millis(50);
            let w = start(Wal::open(cfg).unwrap());
            let pad = format!(r#","pad":"{}""#, "x".repeat(2000));
            // 1,500 commits of a 2 KB record each: ~9 MB of WAL frames.
            for i in 0..1500 {
                w.append(vec![record(i, &pad)]).await.unwrap();
            }
            let len = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().len();
            // Without checkpoints the -wal file would hold every frame.
            assert!(
                len("w.db-wal") < 2 << 20,
                "-wal file {} bytes",
                len("w.db-wal")
            );
            // ~3 MB of records, most of them copied into the database file.
            assert!(len("w.db") > 2 << 20, "database file {} bytes", len("w.db"));
        });
    }

    #[test]
    fn a_fetch_and_an_ack_are_answered_while_an_append_waits_out_its_commit_window() {
        use std::sync::Mutex;
        let sys = actix::System::new();
        sys.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = WalConfig::new(dir.path().join("w.db"), &["a"]);
            cfg.commit_window = Duration::from_millis(400);
            cfg.ack_flush = Duration::from_secs(1);
            let store = start(Wal::open(cfg).unwrap());
            // Appends arriving faster than the window: the next one waits.
            futures_util::future::join_all((0..12).map(|i| store.append(vec![record(i, "")])))
                .await;
            let fetch = || store.fetch("a".into(), 100, Duration::ZERO);
            let Ok(Fetched::Batch(batch)) = fetch().await else {
                panic!("no batch")
            };
            // Past PROBE_EVERY: the window is tried again.
            actix_rt::time::sleep(Duration::from_millis(1100)).await;
            let order = Arc::new(Mutex::new(Vec::new()));
            let (st, o) = (store.clone(), order.clone());
            let waiting = actix_rt::spawn(async move {
                let _ = st.append(vec![record(12, "")]).await;
                o.lock().unwrap().push("append");
            });
            actix_rt::time::sleep(Duration::from_millis(30)).await;
            let _ = store.ack("a".into(), batch.ranges.clone(), vec![]).await;
            order.lock().unwrap().push("ack");
            let _ = fetch().await;
            order.lock().unwrap().push("fetch");
            waiting.await.unwrap();
            assert_eq!(*order.lock().unwrap(), ["ack", "fetch", "append"]);
        });
    }

    #[test]
    fn the_writer_stores_held_acks_once_due_with_no_other_traffic() {
        let sys = actix::System::new();
        sys.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (_store, cursor) = acked_one(dir.path(), Duration::from_millis(200)).await;
            assert_eq!(cursor(), 0, "held in memory at first");
            actix_rt::time::sleep(Duration::from_millis(700)).await;
            assert_eq!(cursor(), 1, "stored once ack_flush passed");
        });
    }

    #[test]
    fn a_stopping_writer_stores_its_held_acks() {
        let dir = tempfile::tempdir().unwrap();
        let sys = actix::System::new();
        let (store, cursor) = sys.block_on(acked_one(dir.path(), Duration::from_secs(10)));
        assert_eq!(cursor(), 0);
        // With its last handle (and so its last address) gone the actor
        // stops, and its writer thread ends once the queue is dropped.
        drop(store);
        sys.block_on(async { actix_rt::time::sleep(Duration::from_millis(100)).await });
        let deadline = Instant::now() + Duration::from_secs(5);
        while cursor() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(cursor(), 1);
    }

    /// The deadline a window gives after `n` appends `gap` apart.
    fn after(window: Duration, gap: Duration, n: u32) -> Option<Duration> {
        let mut w = CommitWindow::new(window);
        let t0 = Instant::now();
        let mut t = t0;
        for i in 0..n {
            t = t0 + gap * i;
            w.arrived(t);
        }
        w.deadline(t).map(|d| d - t)
    }

    #[test]
    fn a_commit_waits_only_while_appends_come_faster_than_its_window() {
        let window = Duration::from_millis(20);
        // 1k/s: the next append is due within the window.
        assert_eq!(after(window, Duration::from_millis(1), 50), Some(window));
        // 40/s (every 25 ms): nothing would come in time, nothing waits.
        assert_eq!(after(window, Duration::from_millis(25), 50), None);
        // The first appends after a start or an idle spell do not wait.
        assert_eq!(after(window, Duration::from_millis(1), 1), None);
        // A zero window never waits.
        assert_eq!(after(Duration::ZERO, Duration::from_millis(1), 50), None);
    }

    #[test]
    fn one_sender_waiting_for_each_answer_is_not_held_back_by_the_window() {
        let window = Duration::from_millis(20);
        let mut w = CommitWindow::new(window);
        let t0 = Instant::now();
        for i in 0..50 {
            w.arrived(t0 + Duration::from_millis(i));
        }
        let t = t0 + Duration::from_millis(50);
        w.arrived(t);
        assert!(w.deadline(t).is_some(), "fast appends: a wait is tried");
        // It gathered nothing: the next ones do not wait...
        let unpaid = t + window;
        w.waited(1, unpaid);
        let t = unpaid + Duration::from_millis(1);
        w.arrived(t);
        assert_eq!(w.deadline(t), None);
        // ...until a probe a second later (appends still coming every ms);
        // a wait that gathered others goes on.
        let end = unpaid + CommitWindow::PROBE_EVERY;
        let mut t = t;
        while t < end {
            t += Duration::from_millis(1);
            w.arrived(t);
            if t < end {
                assert_eq!(w.deadline(t), None);
            }
        }
        assert!(w.deadline(t).is_some());
        w.waited(2, t + window);
        let t = t + window;
        w.arrived(t);
        assert!(w.deadline(t).is_some());
    }

    #[test]
    fn a_waiting_group_sleeps_through_appends_and_wakes_for_a_fetch() {
        use super::super::queue::{Queue, Request};
        // Appends every 100 ms: a group of one would be full (GROUP_FULL)
        // only seconds after its window of 1 s ends.
        let mut w = CommitWindow::new(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..50 {
            w.arrived(t0 + Duration::from_millis(100 * i));
        }
        let health = Arc::new(WalHealth::default());
        let (tx, rx) = mpsc::channel();
        *health.writer.write().unwrap() = Some(Queue {
            tx,
            thread: Some(std::thread::current()),
        });
        let h = health.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            h.send(|| {
                Request::Write(
                    WriteOp::Append(vec![]),
                    Instant::now(),
                    oneshot::channel().0,
                )
            });
            std::thread::sleep(Duration::from_millis(100));
            h.send(|| Request::Stats(oneshot::channel().0));
        });
        let start = Instant::now();
        let first = w.next(&rx, 1, start + Duration::from_secs(1));
        let woke = start.elapsed();
        sender.join().unwrap();
        assert!(matches!(
            first,
            Some(Request::Write(WriteOp::Append(_), ..))
        ));
        // Not woken by the append (20 ms), but by the request after it
        // (120 ms), long before the window's end (1 s).
        assert!(
            woke >= Duration::from_millis(110) && woke < Duration::from_millis(700),
            "woke after {woke:?}"
        );
        assert!(matches!(rx.try_recv(), Ok(Request::Stats(_))));
    }

    #[test]
    fn an_idle_spell_counts_as_one_long_gap_and_a_burst_soon_waits_again() {
        let window = Duration::from_millis(20);
        let mut w = CommitWindow::new(window);
        let t0 = Instant::now();
        for i in 0..50 {
            w.arrived(t0 + Duration::from_millis(i));
        }
        let idle = t0 + Duration::from_secs(3600);
        w.arrived(idle);
        assert_eq!(w.deadline(idle), None, "right after an hour's pause");
        let mut t = idle;
        for i in 1..=40 {
            t = idle + Duration::from_millis(i);
            w.arrived(t);
        }
        assert_eq!(w.deadline(t), Some(t + window), "a burst of 40 at 1k/s");
    }
}
