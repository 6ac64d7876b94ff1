//! Model-based test of compaction (invariants 6 and 7 of the module doc of
//! `actors/src/wal/mod.rs`), beside `wal_model.rs`, which never compacts.
//!
//! Proptest generates random sequences (up to 40 operations, 64 cases) of
//! `Append` (1–5 fresh records), `Fetch` of sink `a` or `b` followed by an
//! ack or a dead-lettering of that batch, `Compact`, `MergeKeys` (the dedup
//! keys held in memory go to the `idem` table) and `Restart`, against
//! one of two configurations: retention and dedup window zero (every
//! finished record is past retention), or a 24 h retention with a 1-byte
//! `max_bytes` (every finished record must make room). After every
//! `Compact` the records still stored (read with SQLite) must be exactly
//! the model's minus a set of records that
//!
//! 7. every sink finished and no sink holds as a dead letter: a record some
//!    sink still needs, or a dead letter, is never removed, and in the
//!    retention-zero case every record below the lowest cursor that is no
//!    dead letter is removed (compaction works);
//! 6. and a new append after compaction (and after a restart) gets a seq
//!    above every seq ever handed out.
//!
//! Every sink still receives every record it has not finished: a final
//! fetch of each sink returns exactly its unfinished seqs.
//!
//! After every step the rows of the dedup table `idem` whose record is
//! stored are exactly the keys of the stored records up to
//! `meta.idem_upto`, each with its record's seq (a merge leaves out the
//! keys of records compacted while they were held in memory); compaction
//! leaves a deleted record's row to the sweep (`Sweep`), after which no
//! row is left whose record is gone.

use std::collections::BTreeSet;
use std::time::Duration;

use gateway_actors::wal::{now_ms, AppendOutcome, NewRecord, Wal, WalConfig};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const SINKS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    /// Fetch up to `max` of `sink` and ack (or dead-letter) the batch.
    Deliver {
        sink: usize,
        max: usize,
        dead: bool,
    },
    Compact,
    MergeKeys,
    /// A whole sweep of `idem` (`Wal::sweep_keys`).
    Sweep,
    Restart,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..=5).prop_map(Op::Append),
        4 => (0..SINKS.len(), 1usize..=6, proptest::bool::weighted(0.2))
            .prop_map(|(sink, max, dead)| Op::Deliver { sink, max, dead }),
        2 => Just(Op::Compact),
        1 => Just(Op::MergeKeys),
        1 => Just(Op::Sweep),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug, Default)]
struct Model {
    /// Seqs stored.
    stored: BTreeSet<u64>,
    /// Highest seq handed out.
    head: u64,
    finished: [BTreeSet<u64>; 2],
    dead: [BTreeSet<u64>; 2],
    counter: u64,
}

impl Model {
    fn removable(&self, seq: u64) -> bool {
        (0..SINKS.len()).all(|i| self.finished[i].contains(&seq) && !self.dead[i].contains(&seq))
    }

    /// Largest n with every seq in 1..=n finished by sink i.
    fn cursor(&self, i: usize) -> u64 {
        let mut n = 0;
        while self.finished[i].contains(&(n + 1)) {
            n += 1;
        }
        n
    }
}

fn stored_seqs(cfg: &WalConfig) -> BTreeSet<u64> {
    let conn = rusqlite::Connection::open(&cfg.path).expect("read connection");
    let mut stmt = conn.prepare("SELECT seq FROM records").unwrap();
    let seqs = stmt
        .query_map([], |r| r.get::<_, u64>(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    seqs
}

/// The `idem` rows against the stored records up to `meta.idem_upto`:
/// (key, seq) pairs of each, read with SQLite.
type KeySeqs = BTreeSet<(String, u64)>;
/// (rows of `idem` whose record is stored, the stored records' keys up to
/// `meta.idem_upto`, rows of `idem` whose record is gone).
fn idem_and_records(cfg: &WalConfig) -> (KeySeqs, KeySeqs, KeySeqs) {
    let conn = rusqlite::Connection::open(&cfg.path).expect("read connection");
    let pairs = |sql: &str| -> KeySeqs {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        rows
    };
    (
        pairs("SELECT i.key, i.seq FROM idem i JOIN records r ON r.seq = i.seq"),
        pairs(
            "SELECT idem_key, seq FROM records WHERE seq <= \
             COALESCE((SELECT value FROM meta WHERE key = 'idem_upto'), 0)",
        ),
        pairs("SELECT key, seq FROM idem WHERE seq NOT IN (SELECT seq FROM records)"),
    )
}

fn fail(what: &str, e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {e}"))
}

fn run(ops: Vec<Op>, size_limited: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = WalConfig::new(dir.path().join("wal.db"), &SINKS);
    cfg.min_free_disk_bytes = 0;
    if size_limited {
        cfg.policy = gateway_actors::wal::BackpressurePolicy::Block;
        cfg.max_bytes = 1;
    } else {
        cfg.retention = Duration::ZERO;
        cfg.dedup_window = Duration::ZERO;
    }
    let mut wal = Wal::open(cfg.clone()).map_err(|e| fail("open", e))?;
    let mut m = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let swept = matches!(op, Op::Sweep);
        match op {
            Op::Append(n) => {
                let recs: Vec<NewRecord> = (0..n)
                    .map(|_| {
                        m.counter += 1;
                        let key = format!("k{}", m.counter);
                        NewRecord {
                            idempotency_key: key.clone(),
                            correlation_id: format!("c{}", m.counter),
                            device_id: "dev-1".into(),
                            receive_ms: now_ms() - 1,
                            body: format!("{{\"idempotency_key\":\"{key}\"}}"),
                            route: Default::default(),
                        }
                    })
                    .collect();
                // A 1-byte limit refuses appends once nothing delivered is
                // left to remove: that is backpressure, not a failure.
                match wal.append(recs) {
                    Ok(outcomes) => {
                        for o in outcomes {
                            let AppendOutcome::Appended { seq } = o else {
                                return Err(fail("append", format!("{o:?} at step {step}")));
                            };
                            prop_assert!(seq > m.head, "seq {} reused (head {})", seq, m.head);
                            m.head = seq;
                            m.stored.insert(seq);
                        }
                    }
                    Err(gateway_actors::wal::WalError::Backpressure(_)) if size_limited => {}
                    Err(e) => return Err(fail("append", e)),
                }
            }
            Op::Deliver { sink, max, dead } => {
                if let Some(b) = wal
                    .fetch(SINKS[sink], max, Duration::ZERO)
                    .map_err(|e| fail("fetch", e))?
                {
                    for r in &b.records {
                        prop_assert!(
                            m.stored.contains(&r.seq),
                            "fetched seq {} not stored",
                            r.seq
                        );
                        prop_assert!(!m.finished[sink].contains(&r.seq));
                        m.finished[sink].insert(r.seq);
                        if dead {
                            m.dead[sink].insert(r.seq);
                        }
                    }
                    if dead {
                        wal.dead(SINKS[sink], &b.ranges, "refused", 3)
                            .map_err(|e| fail("dead", e))?;
                    } else {
                        wal.ack(SINKS[sink], &b.ranges)
                            .map_err(|e| fail("ack", e))?;
                    }
                }
            }
            Op::Compact => {
                wal.refresh_space().map_err(|e| fail("refresh", e))?;
                wal.compact(now_ms(), 5000)
                    .map_err(|e| fail("compact", e))?;
                let now = stored_seqs(&cfg);
                prop_assert!(now.is_subset(&m.stored), "compaction invented records");
                for seq in m.stored.difference(&now) {
                    prop_assert!(
                        m.removable(*seq),
                        "step {}: seq {} removed though a sink still needs it or holds it dead",
                        step,
                        seq
                    );
                }
                if !size_limited {
                    let low = (0..SINKS.len()).map(|i| m.cursor(i)).min().unwrap();
                    for seq in &now {
                        prop_assert!(
                            *seq > low || !m.removable(*seq),
                            "step {}: seq {} is finished everywhere, past retention, and stayed",
                            step,
                            seq
                        );
                    }
                }
                m.stored = now;
            }
            Op::MergeKeys => wal.merge_keys().map_err(|e| fail("merge_keys", e))?,
            Op::Sweep => {
                wal.sweep_keys().map_err(|e| fail("sweep_keys", e))?;
            }
            Op::Restart => {
                drop(wal);
                wal = Wal::open(cfg.clone()).map_err(|e| fail("reopen", e))?;
            }
        }
        let (idem, records, gone) = idem_and_records(&cfg);
        prop_assert_eq!(
            idem,
            records,
            "idem against the records after step {}",
            step
        );
        if swept {
            prop_assert!(gone.is_empty(), "step {}: swept, yet {:?} left", step, gone);
        }
        prop_assert_eq!(
            wal.stats().map_err(|e| fail("stats", e))?.stored_records,
            m.stored.len() as u64,
            "stored_records after step {}",
            step
        );
    }
    // Every sink still receives exactly what it has not finished.
    for (i, name) in SINKS.iter().enumerate() {
        wal.release_all(name).map_err(|e| fail("release_all", e))?;
        let want: Vec<u64> = (1..=m.head)
            .filter(|s| !m.finished[i].contains(s))
            .collect();
        let got: Vec<u64> = match wal.fetch(name, 10_000, Duration::ZERO) {
            Ok(Some(b)) => b.records.iter().map(|r| r.seq).collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(fail("final fetch", e)),
        };
        prop_assert_eq!(got, want, "final fetch of {}", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn compaction_removes_only_what_every_sink_finished(
        ops in proptest::collection::vec(op_strategy(), 1..=40),
        size_limited in any::<bool>(),
    ) {
        run(ops, size_limited)?;
    }
}
