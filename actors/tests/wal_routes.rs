//! Routes, priority classes, live-first drain and TTLs in the WAL engine
//! (DESIGN §6a; the module doc of `actors/src/wal/mod.rs`).
//!
//! The model test drives random appends (each record with a random class
//! and sink set: every sink, one, both or none), deliveries (fetch, then ack,
//! dead-letter or release the batch) and restarts, and checks that every
//! batch is exactly the first records of the sink's queue in (class, seq)
//! order — `high` before `normal` before `low`, seq order within a class —
//! among the records routed to it, and that in the end every sink has
//! received exactly its own records.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use gateway_actors::route::{Class, DrainMode, RecordRoute, SinkPolicy};
use gateway_actors::wal::{now_ms, DlqFilter, NewRecord, Wal, WalConfig, EXPIRED};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const SINKS: [&str; 2] = ["a", "b"];

fn record(key: &str, device: &str, receive_ms: i64, route: RecordRoute) -> NewRecord {
    NewRecord {
        idempotency_key: key.to_string(),
        correlation_id: format!("c-{key}"),
        device_id: device.to_string(),
        receive_ms,
        body: format!("{{\"idempotency_key\":\"{key}\"}}"),
        route,
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Records as (class, sink set: 0 every sink, 1 a, 2 b, 3 both, 4 none).
    Append(Vec<(u8, u8)>),
    Deliver {
        sink: usize,
        max: usize,
        /// 0 ack, 1 dead, 2 release.
        end: u8,
    },
    Restart,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec((0u8..3, 0u8..5), 1..8).prop_map(Op::Append),
        4 => (0..SINKS.len(), 1usize..=6, prop_oneof![3 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)])
            .prop_map(|(sink, max, end)| Op::Deliver { sink, max, end }),
        1 => Just(Op::Restart),
    ]
}

fn class_of(c: u8) -> Class {
    [Class::High, Class::Normal, Class::Low][c as usize]
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WalConfig::new(dir.path().join("wal.db"), &SINKS);
    let mut wal = Wal::open(cfg.clone()).unwrap();
    let bits = wal.sink_bits();
    let (a, b) = (bits["a"], bits["b"]);
    prop_assert_ne!(a, b);
    // Per sink: (class, seq) of the records it still has to finish.
    let mut queue: [BTreeSet<(Class, u64)>; 2] = Default::default();
    let mut n = 0u64;
    for op in ops {
        match op {
            Op::Append(recs) => {
                let batch: Vec<NewRecord> = recs
                    .iter()
                    .map(|&(c, s)| {
                        n += 1;
                        let sinks = [None, Some(a), Some(b), Some(a | b), Some(0)][s as usize];
                        let route = RecordRoute {
                            class: class_of(c),
                            sinks,
                        };
                        record(&format!("k{n}"), "d", now_ms(), route)
                    })
                    .collect();
                let out = wal.append(batch).unwrap();
                for (o, &(c, s)) in out.iter().zip(&recs) {
                    let gateway_actors::wal::AppendOutcome::Appended { seq } = o else {
                        return Err(TestCaseError::fail("fresh keys are never duplicates"));
                    };
                    if matches!(s, 0 | 1 | 3) {
                        queue[0].insert((class_of(c), *seq));
                    }
                    if matches!(s, 0 | 2 | 3) {
                        queue[1].insert((class_of(c), *seq));
                    }
                }
            }
            Op::Deliver { sink, max, end } => {
                let want: Vec<u64> = queue[sink].iter().take(max).map(|&(_, s)| s).collect();
                let got = wal.fetch(SINKS[sink], max, Duration::ZERO).unwrap();
                let got_seqs: Vec<u64> = got
                    .as_ref()
                    .map(|b| b.records.iter().map(|r| r.seq).collect())
                    .unwrap_or_default();
                prop_assert_eq!(&got_seqs, &want, "sink {} batch order", SINKS[sink]);
                let Some(batch) = got else { continue };
                match end {
                    0 => wal.ack(SINKS[sink], &batch.ranges).unwrap(),
                    1 => wal.dead(SINKS[sink], &batch.ranges, "boom", 1).unwrap(),
                    _ => {
                        wal.release(SINKS[sink], &batch.ranges).unwrap();
                        continue;
                    }
                }
                for r in &batch.records {
                    queue[sink].remove(&(r.class, r.seq));
                }
            }
            Op::Restart => {
                drop(wal);
                wal = Wal::open(cfg.clone()).unwrap();
                prop_assert_eq!(wal.sink_bits(), bits.clone(), "bits are kept");
            }
        }
    }
    for (i, sink) in SINKS.iter().enumerate() {
        let mut rest = Vec::new();
        while let Some(batch) = wal.fetch(sink, 7, Duration::ZERO).unwrap() {
            rest.extend(batch.records.iter().map(|r| r.seq));
            wal.ack(sink, &batch.ranges).unwrap();
        }
        let want: Vec<u64> = queue[i].iter().map(|&(_, s)| s).collect();
        prop_assert_eq!(rest, want, "sink {} receives exactly its own records", sink);
        let st = &wal.stats().unwrap().sinks[*sink];
        prop_assert_eq!(st.cursor, wal.head(), "finished up to the head");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn each_sink_gets_its_own_records_high_before_normal_before_low(
        ops in proptest::collection::vec(op_strategy(), 1..40)
    ) {
        run(ops)?;
    }
}

fn open(dir: &std::path::Path, sinks: &[&str]) -> Wal {
    Wal::open(WalConfig::new(dir.join("wal.db"), sinks)).unwrap()
}

fn normal() -> RecordRoute {
    RecordRoute::default()
}

#[test]
fn live_first_sends_records_younger_than_live_after_ahead_of_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = open(dir.path(), &["s"]);
    let old = now_ms() - 600_000;
    let backlog: Vec<NewRecord> = (0..50)
        .map(|i| {
            record(
                &format!("old{i}"),
                &format!("d{}", i % 3),
                old + i,
                normal(),
            )
        })
        .collect();
    wal.append(backlog).unwrap();
    let live: Vec<NewRecord> = (0..10)
        .map(|i| {
            record(
                &format!("new{i}"),
                &format!("d{}", i % 3),
                now_ms(),
                normal(),
            )
        })
        .collect();
    wal.append(live).unwrap();
    wal.set_policy(
        "s",
        SinkPolicy {
            drain: DrainMode::LiveFirst,
            live_after: Duration::from_secs(60),
            ..SinkPolicy::new()
        },
    )
    .unwrap();
    let first = wal.fetch("s", 15, Duration::ZERO).unwrap().unwrap();
    let keys: Vec<&str> = first
        .records
        .iter()
        .map(|r| r.idempotency_key.as_str())
        .collect();
    let mut want: Vec<String> = (0..10).map(|i| format!("new{i}")).collect();
    want.extend((0..5).map(|i| format!("old{i}")));
    assert_eq!(keys, want, "live records first, then the backlog in order");
    wal.ack("s", &first.ranges).unwrap();
    let mut rest = Vec::new();
    while let Some(b) = wal.fetch("s", 7, Duration::ZERO).unwrap() {
        rest.extend(b.records.iter().map(|r| r.idempotency_key.clone()));
        wal.ack("s", &b.ranges).unwrap();
    }
    let want: Vec<String> = (5..50).map(|i| format!("old{i}")).collect();
    assert_eq!(rest, want, "the backlog drains completely, in order");
    assert_eq!(wal.stats().unwrap().sinks["s"].cursor, 60);

    // Fifo (the default) keeps arrival order.
    let dir = tempfile::tempdir().unwrap();
    let mut wal = open(dir.path(), &["s"]);
    wal.append(vec![record("old", "d", old, normal())]).unwrap();
    wal.append(vec![record("new", "d", now_ms(), normal())])
        .unwrap();
    let b = wal.fetch("s", 1, Duration::ZERO).unwrap().unwrap();
    assert_eq!(b.records[0].idempotency_key, "old");
}

/// Sink "lake" expires low records after an hour.
fn low_ttl_one_hour(wal: &mut Wal) {
    wal.set_policy(
        "lake",
        SinkPolicy {
            ttl: BTreeMap::from([(Class::Low, Duration::from_secs(3600))]),
            ..SinkPolicy::new()
        },
    )
    .unwrap();
}

#[test]
fn a_record_past_its_ttl_is_expired_listed_and_delivered_after_a_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = open(dir.path(), &["lake", "other"]);
    let low = RecordRoute {
        class: Class::Low,
        sinks: None,
    };
    let t0 = now_ms() - 3 * 3600 * 1000;
    wal.append(vec![
        record("low-old", "d", t0, low),
        record("normal-old", "d", t0 + 1, normal()),
        record("low-new", "d", now_ms(), low),
    ])
    .unwrap();
    low_ttl_one_hour(&mut wal);
    let expired = wal.expire(now_ms()).unwrap();
    assert_eq!(expired, vec![("lake".to_string(), Class::Low, 1)]);
    assert_eq!(wal.expire(now_ms()).unwrap(), vec![], "judged once");
    let dead = gateway_actors::wal::list_dead(
        wal.connection(),
        &DlqFilter {
            sink: Some("lake".into()),
            ..DlqFilter::default()
        },
    )
    .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, dead[0].error.as_str()), (1, EXPIRED));
    // The other sink has no TTL: it still gets all three.
    let b = wal.fetch("other", 10, Duration::ZERO).unwrap().unwrap();
    assert_eq!(b.records.len(), 3);
    // The expired record is not delivered to the lake ...
    let b = wal.fetch("lake", 10, Duration::ZERO).unwrap().unwrap();
    let keys: Vec<&str> = b
        .records
        .iter()
        .map(|r| r.idempotency_key.as_str())
        .collect();
    assert_eq!(keys, ["normal-old", "low-new"]);
    wal.ack("lake", &b.ranges).unwrap();
    // ... until an operator requeues it; then it does not expire again.
    let n = wal
        .requeue(&DlqFilter {
            sink: Some("lake".into()),
            error: Some(EXPIRED.into()),
            ..DlqFilter::default()
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(wal.expire(now_ms()).unwrap(), vec![]);
    drop(wal);
    let mut wal = open(dir.path(), &["lake", "other"]);
    low_ttl_one_hour(&mut wal);
    assert_eq!(
        wal.expire(now_ms()).unwrap(),
        vec![],
        "the mark survives a restart"
    );
    let b = wal.fetch("lake", 10, Duration::ZERO).unwrap().unwrap();
    assert_eq!(b.records[0].idempotency_key, "low-old");
}

#[test]
fn replay_to_a_named_sink_delivers_records_its_route_did_not_take() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = open(dir.path(), &["a", "b"]);
    let b_bit = wal.sink_bits()["b"];
    let only_b = RecordRoute {
        class: Class::Normal,
        sinks: Some(b_bit),
    };
    let t = now_ms();
    wal.append(vec![
        record("x", "d", t, only_b),
        record("y", "d", t, normal()),
    ])
    .unwrap();
    let got = wal.fetch("a", 10, Duration::ZERO).unwrap().unwrap();
    assert_eq!(got.records.len(), 1, "a's route did not take x");
    wal.ack("a", &got.ranges).unwrap();
    assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 2);
    wal.replay("a", t - 1, t + 1).unwrap();
    drop(wal);
    let mut wal = open(dir.path(), &["a", "b"]);
    let got = wal.fetch("a", 10, Duration::ZERO).unwrap().unwrap();
    let keys: Vec<&str> = got
        .records
        .iter()
        .map(|r| r.idempotency_key.as_str())
        .collect();
    assert_eq!(
        keys,
        ["x", "y"],
        "the operator named the sink, also across a restart"
    );
}

#[test]
fn a_wal_of_the_first_schema_opens_and_its_records_go_to_every_sink() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE records(seq INTEGER PRIMARY KEY, idem_key TEXT NOT NULL, correlation_id TEXT NOT NULL,
                device_id TEXT NOT NULL, receive_ms INTEGER NOT NULL, body TEXT NOT NULL);
             CREATE TABLE sinks(name TEXT PRIMARY KEY, cursor INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta VALUES('schema_version', 1);
             INSERT INTO sinks VALUES('a', 1);
             INSERT INTO records VALUES(1, 'k1', 'c1', 'd', 0, '{}'), (2, 'k2', 'c2', 'd', 0, '{}');",
        )
        .unwrap();
    }
    let mut wal = Wal::open(WalConfig::new(&path, &["a", "b"])).unwrap();
    let got = wal.fetch("a", 10, Duration::ZERO).unwrap().unwrap();
    assert_eq!(got.records.len(), 1);
    assert_eq!(
        (got.records[0].seq, got.records[0].class),
        (2, Class::Normal)
    );
    let v: i64 = wal
        .connection()
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v, 4);
}
