//! Model-based test of the synchronous WAL engine ([`gateway_actors::wal::Wal`]).
//!
//! Proptest generates random sequences (up to 40 operations, 64 cases) of
//! `Append` (1–5 records, sometimes reusing an idempotency key), `Fetch`
//! (sink `a` or `b`, max 1–8, `Duration::ZERO` max_wait), `Ack`, `Fail`
//! (= `release`) and `Dead` of an outstanding batch, a repeated `ack`/`dead`
//! of an already finished batch, `ReleaseAll(sink)`, the operator actions
//! `Requeue` (a sink's dead letters, of one device or all), `Purge` and
//! `Replay` (every retained record to one sink), `MergeKeys` (the dedup keys
//! held in memory go to the `idem` table) and `Restart` (drop the
//! `Wal`, `Wal::open` it again with the same config). After every step the
//! consistency check (`Wal::check`) must find nothing. Each sequence runs
//! against the real engine on a SQLite file in a temp dir and against a small
//! in-memory model; after every step the two must agree.
//!
//! Invariants of the module doc (`actors/src/wal/mod.rs`) checked here:
//!
//! 1. *Appends survive and are fetched until finished* — only across a clean
//!    restart (drop + reopen), not a real crash: every appended record keeps
//!    being fetched (lowest Enqueued seqs first) until the sink acks it or marks
//!    it dead, before and after any number of restarts.
//! 2. *`fetch` order and bounds* — records in ascending seq order, none that is
//!    finished or InFlight for the sink, at most `max`, and exactly the lowest
//!    Enqueued seqs of that sink; `Batch.ranges` cover exactly the fetched
//!    seqs (no compaction here, so there are no gaps); each record's `json`
//!    starts with `{"v":1,"seq":N,` and carries its idempotency key.
//! 3. *`ack`/`dead` are idempotent, finished is final* — re-acking or
//!    dead-lettering a finished batch changes nothing (counts, cursor, dead
//!    letters), and a finished record is never fetched again.
//! 4. *No InFlight after a restart* — `stats()` shows `inflight == 0` for every
//!    sink and the records of the voided batches are fetched again.
//! 5. *Dedup* — a key seen before (in an earlier append or earlier in the same
//!    append; all within the default 24 h window) yields `Duplicate` with the
//!    original seq and correlation id, and stores nothing (`head` and
//!    `stored_records` do not move).
//! 6. *`seq` never goes backwards* — partially: new records get `head + 1,
//!    head + 2, …`, also after restarts. Compaction (`seq_floor`) and failed
//!    group commits are not exercised.
//!
//! Invariant 7 (compaction) is checked by `wal_compaction_model.rs`, which
//! also covers invariant 6 across compaction; here `compact` is never called.
//!
//! After every step `stats()` must match the model: `head`, `stored_records`,
//! and per sink `cursor` (largest `n` with all of `1..=n` finished),
//! `enqueued`, `inflight`, `dead` and `oldest_pending_ms` (receive time of
//! `cursor + 1`, if that record exists).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use gateway_actors::wal::{now_ms, AppendOutcome, Batch, DlqFilter, NewRecord, Wal, WalConfig};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const SINKS: [&str; 2] = ["a", "b"];

/// How one appended record picks its idempotency key.
#[derive(Debug, Clone)]
enum Key {
    /// A key never used before.
    Fresh,
    /// A key used before (index modulo the keys used so far); `Fresh` when
    /// none was used yet.
    Reuse(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Key>),
    Fetch {
        sink: usize,
        max: usize,
    },
    /// Ack the outstanding batch at `pick % len`.
    Ack {
        pick: usize,
    },
    /// `release` the outstanding batch at `pick % len` (a failed delivery).
    Fail {
        pick: usize,
    },
    /// Dead-letter the outstanding batch at `pick % len`.
    Dead {
        pick: usize,
    },
    /// Ack (or dead-letter, with `dead`) again a batch that is already finished.
    Repeat {
        pick: usize,
        dead: bool,
    },
    ReleaseAll {
        sink: usize,
    },
    /// `requeue` the sink's dead letters (of one device, or all).
    Requeue {
        sink: usize,
        device: Option<u64>,
    },
    /// `purge` the sink's dead letters.
    Purge {
        sink: usize,
    },
    /// `replay` every retained record to the sink.
    Replay {
        sink: usize,
    },
    MergeKeys,
    Restart,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let key = prop_oneof![3 => Just(Key::Fresh), 1 => any::<usize>().prop_map(Key::Reuse)];
    prop_oneof![
        4 => proptest::collection::vec(key, 1..=5).prop_map(Op::Append),
        5 => (0..SINKS.len(), 1usize..=8).prop_map(|(sink, max)| Op::Fetch { sink, max }),
        3 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Fail { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Dead { pick }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, dead)| Op::Repeat { pick, dead }),
        1 => (0..SINKS.len()).prop_map(|sink| Op::ReleaseAll { sink }),
        1 => (0..SINKS.len(), proptest::option::of(0u64..3))
            .prop_map(|(sink, device)| Op::Requeue { sink, device }),
        1 => (0..SINKS.len()).prop_map(|sink| Op::Purge { sink }),
        1 => (0..SINKS.len()).prop_map(|sink| Op::Replay { sink }),
        1 => Just(Op::MergeKeys),
        1 => Just(Op::Restart),
    ]
}

/// One stored record as the model knows it.
#[derive(Debug, Clone)]
struct ModelRecord {
    key: String,
    correlation_id: String,
    device_id: String,
    receive_ms: i64,
}

#[derive(Debug, Default)]
struct SinkModel {
    /// Acked or dead.
    finished: BTreeSet<u64>,
    inflight: BTreeSet<u64>,
    dead: BTreeSet<u64>,
}

impl SinkModel {
    /// Largest `n` such that every seq in `1..=n` is finished.
    fn cursor(&self) -> u64 {
        let mut n = 0;
        while self.finished.contains(&(n + 1)) {
            n += 1;
        }
        n
    }

    /// Enqueued seqs (neither finished nor InFlight) in ascending order.
    fn enqueued(&self, head: u64) -> Vec<u64> {
        (1..=head)
            .filter(|s| !self.finished.contains(s) && !self.inflight.contains(s))
            .collect()
    }
}

#[derive(Debug, Default)]
struct Model {
    /// `records[seq - 1]`.
    records: Vec<ModelRecord>,
    /// Idempotency key → seq of the original.
    by_key: HashMap<String, u64>,
    /// Keys in the order they were first used (what `Key::Reuse` picks from).
    used_keys: Vec<String>,
    sinks: [SinkModel; 2],
    /// Counter for fresh keys and correlation ids.
    counter: u64,
}

impl Model {
    fn head(&self) -> u64 {
        self.records.len() as u64
    }
}

/// A batch handed out by the engine, with the sink index it belongs to.
struct Held {
    sink: usize,
    batch: Batch,
}

impl Held {
    fn seqs(&self) -> Vec<u64> {
        self.batch.records.iter().map(|r| r.seq).collect()
    }
}

fn ranges_to_seqs(ranges: &[(u64, u64)]) -> Vec<u64> {
    ranges.iter().flat_map(|&(a, b)| a..=b).collect()
}

/// Compares `stats()` with the model.
fn check_stats(wal: &Wal, model: &Model, step: usize) -> Result<(), TestCaseError> {
    let stats = wal
        .stats()
        .map_err(|e| TestCaseError::fail(format!("stats: {e}")))?;
    prop_assert_eq!(stats.head, model.head(), "head after step {}", step);
    prop_assert_eq!(
        stats.stored_records,
        model.head(),
        "stored_records after step {}",
        step
    );
    prop_assert_eq!(stats.sinks.len(), SINKS.len());
    for (i, name) in SINKS.iter().enumerate() {
        let got = &stats.sinks[*name];
        let m = &model.sinks[i];
        let cursor = m.cursor();
        prop_assert_eq!(got.cursor, cursor, "cursor of {} after step {}", name, step);
        prop_assert_eq!(
            got.enqueued,
            m.enqueued(model.head()).len() as u64,
            "enqueued of {} after step {}",
            name,
            step
        );
        prop_assert_eq!(
            got.inflight,
            m.inflight.len() as u64,
            "inflight of {} after step {}",
            name,
            step
        );
        prop_assert_eq!(
            got.dead,
            m.dead.len() as u64,
            "dead of {} after step {}",
            name,
            step
        );
        let oldest = model.records.get(cursor as usize).map(|r| r.receive_ms);
        prop_assert_eq!(
            got.oldest_pending_ms,
            oldest,
            "oldest_pending_ms of {} after step {}",
            name,
            step
        );
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = WalConfig::new(dir.path().join("wal.db"), &SINKS);
    let mut wal = Some(Wal::open(cfg.clone()).expect("open"));
    let mut model = Model::default();
    let mut outstanding: Vec<Held> = Vec::new();
    let mut finished: Vec<Held> = Vec::new();

    check_stats(wal.as_ref().unwrap(), &model, 0)?;
    for (step, op) in ops.into_iter().enumerate() {
        let step = step + 1;
        let w = wal.as_mut().unwrap();
        match op {
            Op::Append(keys) => {
                let mut records = Vec::new();
                let mut expected = Vec::new();
                for k in keys {
                    model.counter += 1;
                    let n = model.counter;
                    let key = match k {
                        Key::Reuse(i) if !model.used_keys.is_empty() => {
                            model.used_keys[i % model.used_keys.len()].clone()
                        }
                        _ => format!("dev-{}:m{n}", n % 3),
                    };
                    let rec = NewRecord {
                        idempotency_key: key.clone(),
                        correlation_id: format!("corr-{n}"),
                        device_id: format!("dev-{}", n % 3),
                        receive_ms: now_ms(),
                        body: format!("{{\"idempotency_key\":\"{key}\"}}"),
                        route: Default::default(),
                    };
                    // Expected outcome; the model is updated record by record, as
                    // a key repeated inside one append is a duplicate too.
                    match model.by_key.get(&key) {
                        Some(&seq) => expected.push(AppendOutcome::Duplicate {
                            seq,
                            correlation_id: model.records[seq as usize - 1].correlation_id.clone(),
                        }),
                        None => {
                            model.records.push(ModelRecord {
                                key: key.clone(),
                                correlation_id: rec.correlation_id.clone(),
                                device_id: rec.device_id.clone(),
                                receive_ms: rec.receive_ms,
                            });
                            let seq = model.head();
                            model.by_key.insert(key.clone(), seq);
                            model.used_keys.push(key);
                            expected.push(AppendOutcome::Appended { seq });
                        }
                    }
                    records.push(rec);
                }
                let got = w
                    .append(records)
                    .map_err(|e| TestCaseError::fail(format!("append: {e}")))?;
                prop_assert_eq!(got, expected, "append outcomes at step {}", step);
            }
            Op::Fetch { sink, max } => {
                let name = SINKS[sink];
                let got = w
                    .fetch(name, max, Duration::ZERO)
                    .map_err(|e| TestCaseError::fail(format!("fetch: {e}")))?;
                let m = &mut model.sinks[sink];
                let want: Vec<u64> = m
                    .enqueued(model.records.len() as u64)
                    .into_iter()
                    .take(max)
                    .collect();
                match got {
                    None => prop_assert!(
                        want.is_empty(),
                        "fetch({name}, {max}) returned None, expected {want:?} at step {step}"
                    ),
                    Some(batch) => {
                        let seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
                        prop_assert_eq!(&batch.sink, name);
                        prop_assert!(
                            seqs.len() <= max,
                            "fetch({}, {}) returned {:?}",
                            name,
                            max,
                            seqs
                        );
                        prop_assert!(
                            seqs.windows(2).all(|p| p[0] < p[1]),
                            "not in seq order: {:?}",
                            seqs
                        );
                        for s in &seqs {
                            prop_assert!(
                                !m.finished.contains(s),
                                "fetched finished seq {} for {} at step {}",
                                s,
                                name,
                                step
                            );
                            prop_assert!(
                                !m.inflight.contains(s),
                                "fetched InFlight seq {} for {} at step {}",
                                s,
                                name,
                                step
                            );
                        }
                        prop_assert_eq!(&seqs, &want, "fetch({}, {}) at step {}", name, max, step);
                        prop_assert_eq!(
                            ranges_to_seqs(&batch.ranges),
                            seqs.clone(),
                            "ranges {:?} of fetch({}, {}) at step {}",
                            batch.ranges,
                            name,
                            max,
                            step
                        );
                        for r in &batch.records {
                            let mr = &model.records[r.seq as usize - 1];
                            let prefix = format!("{{\"v\":1,\"seq\":{},", r.seq);
                            prop_assert!(
                                r.json.starts_with(&prefix),
                                "json {:?} of seq {}",
                                r.json,
                                r.seq
                            );
                            prop_assert!(
                                r.json.contains(&mr.key),
                                "json {:?} lacks key {:?}",
                                r.json,
                                mr.key
                            );
                            prop_assert_eq!(&r.idempotency_key, &mr.key);
                            prop_assert_eq!(&r.device_id, &mr.device_id);
                            prop_assert_eq!(r.receive_ms, mr.receive_ms);
                        }
                        m.inflight.extend(seqs.iter().copied());
                        outstanding.push(Held { sink, batch });
                    }
                }
            }
            Op::Ack { pick } | Op::Dead { pick } if !outstanding.is_empty() => {
                let held = outstanding.remove(pick % outstanding.len());
                let name = SINKS[held.sink];
                let m = &mut model.sinks[held.sink];
                let is_dead = matches!(op, Op::Dead { .. });
                if is_dead {
                    w.dead(name, &held.batch.ranges, "boom", 3)
                        .map_err(|e| TestCaseError::fail(format!("dead: {e}")))?;
                } else {
                    w.ack(name, &held.batch.ranges)
                        .map_err(|e| TestCaseError::fail(format!("ack: {e}")))?;
                }
                for s in held.seqs() {
                    m.inflight.remove(&s);
                    if is_dead && !m.finished.contains(&s) {
                        m.dead.insert(s);
                    }
                    m.finished.insert(s);
                }
                finished.push(held);
            }
            Op::Fail { pick } if !outstanding.is_empty() => {
                let held = outstanding.remove(pick % outstanding.len());
                w.release(SINKS[held.sink], &held.batch.ranges)
                    .map_err(|e| TestCaseError::fail(format!("release: {e}")))?;
                for s in held.seqs() {
                    model.sinks[held.sink].inflight.remove(&s);
                }
            }
            Op::Repeat { pick, dead } if !finished.is_empty() => {
                // Finished is final: nothing of the model changes, unless a
                // requeue or replay made some of it Enqueued again, which a
                // repeated ack or dead finishes like a first one.
                let held = &finished[pick % finished.len()];
                let name = SINKS[held.sink];
                if dead {
                    w.dead(name, &held.batch.ranges, "again", 9)
                        .map_err(|e| TestCaseError::fail(format!("repeated dead: {e}")))?;
                } else {
                    w.ack(name, &held.batch.ranges)
                        .map_err(|e| TestCaseError::fail(format!("repeated ack: {e}")))?;
                }
                let m = &mut model.sinks[held.sink];
                for s in held.seqs() {
                    if !m.finished.contains(&s) {
                        // The engine finishes by range, whichever batch holds it.
                        m.inflight.remove(&s);
                        if dead {
                            m.dead.insert(s);
                        }
                        m.finished.insert(s);
                    }
                }
            }
            Op::ReleaseAll { sink } => {
                w.release_all(SINKS[sink])
                    .map_err(|e| TestCaseError::fail(format!("release_all: {e}")))?;
                outstanding.retain(|h| h.sink != sink);
                model.sinks[sink].inflight.clear();
            }
            Op::Requeue { sink, device } => {
                let filter = DlqFilter {
                    sink: Some(SINKS[sink].to_string()),
                    device: device.map(|d| format!("dev-{d}")),
                    ..DlqFilter::default()
                };
                let got = w
                    .requeue(&filter)
                    .map_err(|e| TestCaseError::fail(format!("requeue: {e}")))?;
                let m = &mut model.sinks[sink];
                let back: Vec<u64> = m
                    .dead
                    .iter()
                    .copied()
                    .filter(|s| {
                        device.is_none_or(|d| {
                            model.records[*s as usize - 1].device_id == format!("dev-{d}")
                        })
                    })
                    .collect();
                for s in &back {
                    m.dead.remove(s);
                    m.finished.remove(s);
                }
                prop_assert_eq!(got, back.len() as u64, "requeued at step {}", step);
            }
            Op::Purge { sink } => {
                let filter = DlqFilter {
                    sink: Some(SINKS[sink].to_string()),
                    ..DlqFilter::default()
                };
                let got = w
                    .purge(&filter)
                    .map_err(|e| TestCaseError::fail(format!("purge: {e}")))?;
                let m = &mut model.sinks[sink];
                prop_assert_eq!(got, m.dead.len() as u64, "purged at step {}", step);
                // Purged letters stay finished: they are never delivered.
                m.dead.clear();
            }
            Op::Replay { sink } => {
                let got = w
                    .replay(SINKS[sink], 0, i64::MAX)
                    .map_err(|e| TestCaseError::fail(format!("replay: {e}")))?;
                let m = &mut model.sinks[sink];
                let head = model.records.len() as u64;
                let candidates: Vec<u64> = (1..=head).filter(|s| !m.dead.contains(s)).collect();
                let again: Vec<u64> = candidates
                    .iter()
                    .copied()
                    .filter(|s| m.finished.contains(s))
                    .collect();
                for s in &again {
                    m.finished.remove(s);
                }
                prop_assert_eq!(
                    got.matched,
                    candidates.len() as u64,
                    "matched at step {}",
                    step
                );
                prop_assert_eq!(
                    got.replayed,
                    again.len() as u64,
                    "replayed at step {}",
                    step
                );
            }
            Op::MergeKeys => {
                wal.as_mut()
                    .unwrap()
                    .merge_keys()
                    .map_err(|e| TestCaseError::fail(format!("merge_keys: {e}")))?;
            }
            Op::Restart => {
                drop(wal.take());
                wal = Some(
                    Wal::open(cfg.clone())
                        .map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?,
                );
                outstanding.clear();
                for m in &mut model.sinks {
                    m.inflight.clear();
                }
                let stats = wal
                    .as_ref()
                    .unwrap()
                    .stats()
                    .map_err(|e| TestCaseError::fail(format!("stats: {e}")))?;
                for name in SINKS {
                    prop_assert_eq!(
                        stats.sinks[name].inflight,
                        0,
                        "InFlight for {} after restart",
                        name
                    );
                }
            }
            // Ack/Fail/Dead/Repeat with no batch to take: nothing to do.
            Op::Ack { .. } | Op::Fail { .. } | Op::Dead { .. } | Op::Repeat { .. } => {}
        }
        check_stats(wal.as_ref().unwrap(), &model, step)?;
        let report = wal
            .as_mut()
            .unwrap()
            .check(false)
            .map_err(|e| TestCaseError::fail(format!("check: {e}")))?;
        prop_assert!(
            report.ok,
            "wal check after step {}: {:?}",
            step,
            report.problems
        );
    }

    // Finally, every record not finished for a sink is still fetched for it
    // (after voiding whatever is InFlight), in order.
    let w = wal.as_mut().unwrap();
    let head = model.head();
    for (i, name) in SINKS.iter().enumerate() {
        w.release_all(name)
            .map_err(|e| TestCaseError::fail(format!("release_all: {e}")))?;
        let m = &mut model.sinks[i];
        m.inflight.clear();
        let want = m.enqueued(head);
        let got: Vec<u64> = match w.fetch(name, 1000, Duration::ZERO) {
            Ok(Some(b)) => b.records.iter().map(|r| r.seq).collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(TestCaseError::fail(format!("final fetch: {e}"))),
        };
        prop_assert_eq!(got, want, "final fetch of {}", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // Do not write proptest-regressions/ files into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn wal_agrees_with_model(ops in proptest::collection::vec(op_strategy(), 1..=40)) {
        run(ops)?;
    }
}
