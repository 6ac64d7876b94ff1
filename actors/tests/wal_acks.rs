//! Lazily stored sink acknowledgements (`WalConfig::ack_flush`, issue 31):
//! an acknowledgement changes the delivery state in memory at once, and goes
//! to disk with the first commit after `ack_flush`, or in a commit of its own
//! without an fsync. A crash in between delivers those records again (at
//! least once) and loses no record; with `ack_flush` zero every
//! acknowledgement is committed at once.
//!
//! Dropping a `Wal` without [`Wal::flush_acks`] is a crash here: nothing of
//! what memory held reaches the disk (the writer thread flushes when it
//! stops; a kill -9 or a power cut does not).

use std::path::Path;
use std::time::Duration;

use gateway_actors::wal::{now_ms, AppendOutcome, NewRecord, Wal, WalConfig};

fn config(dir: &Path, ack_flush: Duration) -> WalConfig {
    let mut cfg = WalConfig::new(dir.join("wal.db"), &["a", "b"]);
    cfg.ack_flush = ack_flush;
    cfg
}

fn append(wal: &mut Wal, from: u64, n: u64) -> Vec<u64> {
    let records = (from..from + n)
        .map(|i| NewRecord {
            idempotency_key: format!("dev:{i}"),
            correlation_id: format!("c{i}"),
            device_id: "dev".into(),
            receive_ms: now_ms(),
            body: format!("{{\"idempotency_key\":\"dev:{i}\"}}"),
            route: Default::default(),
        })
        .collect();
    wal.append(records)
        .unwrap()
        .into_iter()
        .map(|o| match o {
            AppendOutcome::Appended { seq } => seq,
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Fetches and acks everything sink `a` has, returning the seqs.
fn deliver_all(wal: &mut Wal, sink: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    while let Some(b) = wal.fetch(sink, 1000, Duration::ZERO).unwrap() {
        seqs.extend(b.records.iter().map(|r| r.seq));
        wal.ack(sink, &b.ranges).unwrap();
    }
    seqs
}

fn pending(wal: &mut Wal, sink: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    while let Some(b) = wal.fetch(sink, 1000, Duration::ZERO).unwrap() {
        seqs.extend(b.records.iter().map(|r| r.seq));
    }
    seqs
}

fn wal_file_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("wal.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0)
}

#[test]
fn acks_held_in_memory_write_nothing_and_a_crash_delivers_them_again_without_losing_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Duration::from_secs(60));
    let mut wal = Wal::open(cfg.clone()).unwrap();
    let seqs = append(&mut wal, 0, 10);
    let before = wal_file_len(dir.path());
    let changes = wal.total_changes();
    assert_eq!(deliver_all(&mut wal, "a"), seqs);
    // Nothing was written: `gateway_wal_commits_total` does not count these.
    assert_eq!(wal.total_changes(), changes);
    // In memory the sink is done: nothing is fetched twice while running.
    assert!(pending(&mut wal, "a").is_empty());
    assert_eq!(
        wal_file_len(dir.path()),
        before,
        "acks held in memory wrote to the WAL file"
    );
    drop(wal); // a crash: the held acks never reach the disk

    let mut wal = Wal::open(cfg).unwrap();
    // Exactly the acknowledgements of the last `ack_flush` come back: the
    // records are delivered again, none is lost.
    assert_eq!(pending(&mut wal, "a"), seqs);
    assert_eq!(pending(&mut wal, "b"), seqs);
}

#[test]
fn a_flush_stores_the_held_acks_and_a_restart_does_not_deliver_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Duration::from_secs(60));
    let mut wal = Wal::open(cfg.clone()).unwrap();
    let seqs = append(&mut wal, 0, 10);
    deliver_all(&mut wal, "a");
    assert!(wal.acks_due_in().is_some(), "acks are held");
    wal.flush_acks().unwrap();
    assert!(wal.acks_due_in().is_none(), "nothing is held after a flush");
    drop(wal);

    let mut wal = Wal::open(cfg).unwrap();
    assert!(pending(&mut wal, "a").is_empty());
    assert_eq!(pending(&mut wal, "b"), seqs);
}

#[test]
fn held_acks_go_to_disk_with_the_first_append_after_ack_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Duration::from_millis(100));
    let mut wal = Wal::open(cfg.clone()).unwrap();
    append(&mut wal, 0, 10);
    deliver_all(&mut wal, "a");
    // Before ack_flush an append does not carry them...
    let second = append(&mut wal, 10, 1);
    assert!(wal.acks_due_in().is_some());
    std::thread::sleep(Duration::from_millis(150));
    // ...after it, the next one does.
    let third = append(&mut wal, 11, 1);
    assert!(wal.acks_due_in().is_none());
    drop(wal);

    let mut wal = Wal::open(cfg).unwrap();
    assert_eq!(
        pending(&mut wal, "a"),
        [second, third].concat(),
        "only the records appended after the acks are pending"
    );
}

#[test]
fn with_ack_flush_zero_every_ack_is_committed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Duration::ZERO);
    let mut wal = Wal::open(cfg.clone()).unwrap();
    let seqs = append(&mut wal, 0, 10);
    let before = wal_file_len(dir.path());
    deliver_all(&mut wal, "a");
    assert!(wal_file_len(dir.path()) > before, "the ack was written");
    assert!(wal.acks_due_in().is_none());
    drop(wal);

    let mut wal = Wal::open(cfg).unwrap();
    assert!(pending(&mut wal, "a").is_empty());
    assert_eq!(pending(&mut wal, "b"), seqs);
}

#[test]
fn compaction_past_held_acks_then_a_crash_leaves_nothing_pending_and_the_cursors_move_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Duration::from_secs(60));
    cfg.retention = Duration::ZERO;
    cfg.dedup_window = Duration::ZERO;
    let mut wal = Wal::open(cfg.clone()).unwrap();
    append(&mut wal, 0, 10);
    deliver_all(&mut wal, "a");
    deliver_all(&mut wal, "b");
    std::thread::sleep(Duration::from_millis(5));
    let (compacted, _) = wal.compact(now_ms(), 1000).unwrap();
    assert_eq!(compacted, 10);
    drop(wal);

    // The records are gone while the acks that allowed it were only in
    // memory: the stored cursors are below deleted records. Nothing is
    // pending, and the next deliveries move the stored cursors past the gap.
    let mut wal = Wal::open(cfg.clone()).unwrap();
    assert!(pending(&mut wal, "a").is_empty());
    assert!(pending(&mut wal, "b").is_empty());
    let next = append(&mut wal, 10, 5);
    assert_eq!(deliver_all(&mut wal, "a"), next);
    wal.flush_acks().unwrap();
    drop(wal);
    let db = rusqlite::Connection::open(dir.path().join("wal.db")).unwrap();
    let cursor: u64 = db
        .query_row("SELECT cursor FROM sinks WHERE name = 'a'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(cursor, *next.last().unwrap());
    let ranges: u64 = db
        .query_row("SELECT COUNT(*) FROM sink_done", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ranges, 0, "no finished range waits above a stale cursor");
}
