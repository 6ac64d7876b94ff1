//! Appends with dedup, and the group write: appends, acks, dead letters and
//! releases applied in one transaction with one commit (one fsync).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::{params, OptionalExtension, Transaction};

use super::engine::{now_ms, AppendOutcome, NewRecord, Wal, WriteOp, WriteResult};
use super::error::WalError;
use super::ranges::RangeSet;
use super::sink_state::{held_acks_due, persist_dirty};
use super::space::COMPACT_CHUNK;

/// Dedup keys held in memory before a group commit merges them into the
/// `idem` table (~100 bytes each).
pub(super) const MERGE_KEYS_AT: usize = 8192;
/// An idle writer merges the keys it holds after this long without appends.
const MERGE_KEYS_IDLE: Duration = Duration::from_secs(2);

/// Writes `keys` (idempotency key -> latest seq, all above the `idem` table's
/// mark) into `idem` in key order, so each leaf page is written once per
/// merge, and moves the mark to `upto`. Their records all exist: a record is
/// deleted only after its key was merged ([`Wal::merge_keys_upto`]), and the
/// trigger `records_forget_idem` then takes the key with it.
fn write_keys(tx: &Transaction, keys: &HashMap<String, u64>, upto: u64) -> Result<(), WalError> {
    let mut sorted: Vec<(&String, &u64)> = keys.iter().collect();
    sorted.sort_unstable();
    let mut put = tx.prepare_cached("INSERT OR REPLACE INTO idem(key, seq) VALUES(?1, ?2)")?;
    for (key, seq) in sorted {
        put.execute(params![key, seq])?;
    }
    tx.execute(
        "INSERT INTO meta(key, value) VALUES('idem_upto', ?1) ON CONFLICT(key) DO UPDATE SET value = ?1",
        [upto],
    )?;
    Ok(())
}

impl Wal {
    /// Applies `ops` in one transaction with one commit (one fsync).
    ///
    /// The outer `Err` means the transaction failed and nothing of it is
    /// stored; an inner `Err` refuses that op alone (backpressure, unknown sink).
    #[allow(clippy::type_complexity)]
    pub fn write(
        &mut self,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<WriteResult, WalError>>, WalError> {
        if self.backpressure.is_some()
            && self.live_bytes > self.cfg.max_bytes
            && ops.iter().any(|op| matches!(op, WriteOp::Append(_)))
        {
            // Only data that a sink still needs may refuse an append:
            // delivered records make room first.
            self.make_room(COMPACT_CHUNK)?;
        }
        let seq_before = self.next_seq;
        let stored_before = self.stored_records;
        let mut undo = Vec::new();
        let res = self.write_inner(ops, &mut undo);
        if !undo.is_empty() {
            self.last_append = Instant::now();
        }
        match res {
            Ok((out, stored)) => {
                if stored {
                    // Every sink touched is now stored as it is in memory.
                    self.sinks_stored();
                }
                Ok(out)
            }
            Err(e) => {
                // Rolled back: hand the seqs out again so none is skipped
                // (a gap above a cursor would never be acked).
                self.next_seq = seq_before;
                self.stored_records = stored_before;
                // And the keys it stored are not known any more.
                for (key, before) in undo.into_iter().rev() {
                    match before {
                        Some(seq) => self.recent_keys.insert(key, seq),
                        None => self.recent_keys.remove(&key),
                    };
                }
                Err(e)
            }
        }
    }

    /// Returns the answers, and whether the sinks' delivery state was
    /// stored: with a dead letter (its row and the range it finishes go
    /// together), or once acknowledgements waited `ack_flush`.
    #[allow(clippy::type_complexity)]
    fn write_inner(
        &mut self,
        ops: &[WriteOp],
        undo: &mut Vec<(String, Option<u64>)>,
    ) -> Result<(Vec<Result<WriteResult, WalError>>, bool), WalError> {
        let window_start = now_ms() - self.cfg.dedup_window.as_millis() as i64;
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(ops.len());
        {
            // A key merged into `idem`, and a key still in memory.
            let mut find = tx.prepare_cached(
                "SELECT r.seq, r.correlation_id, r.receive_ms FROM idem i JOIN records r ON r.seq = i.seq WHERE i.key = ?1",
            )?;
            let mut find_seq = tx.prepare_cached(
                "SELECT seq, correlation_id, receive_ms FROM records WHERE seq = ?1 AND idem_key = ?2",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO records(seq, idem_key, correlation_id, device_id, receive_ms, body, class, sinks) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let mut insert_dead = tx.prepare_cached(
                "INSERT OR REPLACE INTO dead(sink, seq, attempts, error, dead_ms) SELECT ?1, seq, ?2, ?3, ?4 FROM records WHERE seq BETWEEN ?5 AND ?6",
            )?;
            for op in ops {
                match op {
                    WriteOp::Append(records) => {
                        if let Some(why) = &self.backpressure {
                            out.push(Err(WalError::Backpressure(why.clone())));
                            continue;
                        }
                        let mut outcomes = Vec::with_capacity(records.len());
                        for rec in records {
                            let row = |r: &rusqlite::Row| Ok((r.get(0)?, r.get(1)?, r.get(2)?));
                            let prior: Option<(u64, String, i64)> = match self
                                .recent_keys
                                .get(&rec.idempotency_key)
                            {
                                Some(&seq) => find_seq
                                    .query_row(params![seq, rec.idempotency_key], row)
                                    .optional()?,
                                None => find.query_row([&rec.idempotency_key], row).optional()?,
                            };
                            match prior {
                                Some((seq, correlation_id, ms)) if ms >= window_start => {
                                    outcomes.push(AppendOutcome::Duplicate {
                                        seq,
                                        correlation_id,
                                    });
                                }
                                _ => {
                                    let seq = self.next_seq;
                                    insert.execute(params![
                                        seq,
                                        rec.idempotency_key,
                                        rec.correlation_id,
                                        rec.device_id,
                                        rec.receive_ms,
                                        rec.body,
                                        rec.route.class.code(),
                                        rec.route.sinks.map(|s| s as i64)
                                    ])?;
                                    self.next_seq += 1;
                                    self.stored_records += 1;
                                    let before =
                                        self.recent_keys.insert(rec.idempotency_key.clone(), seq);
                                    undo.push((rec.idempotency_key.clone(), before));
                                    outcomes.push(AppendOutcome::Appended { seq });
                                }
                            }
                        }
                        out.push(Ok(WriteResult::Appended(outcomes)));
                    }
                    WriteOp::Ack {
                        sink,
                        ranges,
                        reduce,
                    } => match self.sinks.get_mut(sink) {
                        None => out.push(Err(WalError::UnknownSink(sink.clone()))),
                        Some(st) => {
                            for &(a, b) in ranges {
                                st.finish(a, b);
                            }
                            st.set_reduce_rows(reduce);
                            if st.dirty && self.unstored_since.is_none() {
                                self.unstored_since = Some(Instant::now());
                            }
                            out.push(Ok(WriteResult::Done));
                        }
                    },
                    WriteOp::Dead {
                        sink,
                        ranges,
                        error,
                        attempts,
                    } => match self.sinks.get_mut(sink) {
                        None => out.push(Err(WalError::UnknownSink(sink.clone()))),
                        Some(st) => {
                            let now = now_ms();
                            for &(a, b) in ranges {
                                // Only records still unfinished become dead letters.
                                let lo = a.max(st.cursor + 1);
                                if lo <= b {
                                    let mut open = RangeSet::new();
                                    open.insert(lo, b);
                                    for &(x, y) in st.done.ranges() {
                                        open.remove(x, y);
                                    }
                                    for &(x, y) in open.ranges() {
                                        let n = insert_dead
                                            .execute(params![sink, attempts, error, now, x, y])?;
                                        st.dead_count += n as u64;
                                    }
                                }
                                st.finish(a, b);
                            }
                            out.push(Ok(WriteResult::Done));
                        }
                    },
                }
            }
        }
        let store = held_acks_due(self.unstored_since, self.cfg.ack_flush)
            || ops.iter().any(|op| matches!(op, WriteOp::Dead { .. }));
        if store {
            persist_dirty(&tx, &self.sinks)?;
        }
        let merged = self.recent_keys.len() >= MERGE_KEYS_AT;
        if merged {
            write_keys(&tx, &self.recent_keys, self.next_seq - 1)?;
        }
        tx.commit()?;
        if merged {
            self.keys_merged();
        }
        Ok((out, store))
    }

    /// Merges the dedup keys held in memory into the `idem` table, in their
    /// own transaction, when no record was appended for [`MERGE_KEYS_IDLE`]:
    /// an idle gateway holds no keys in memory, and a restart reads few back.
    pub fn merge_keys_if_idle(&mut self) -> Result<(), WalError> {
        if self.recent_keys.is_empty() || self.last_append.elapsed() < MERGE_KEYS_IDLE {
            return Ok(());
        }
        self.merge_keys()
    }

    /// Before records up to `upto` are deleted: merges the keys held in
    /// memory if some of them are of those records.
    pub(super) fn merge_keys_upto(&mut self, upto: u64) -> Result<(), WalError> {
        if upto > self.idem_upto && !self.recent_keys.is_empty() {
            self.merge_keys()?;
        }
        Ok(())
    }

    /// Merges the dedup keys held in memory into the `idem` table now, in
    /// their own transaction.
    pub fn merge_keys(&mut self) -> Result<(), WalError> {
        let tx = self.conn.transaction()?;
        write_keys(&tx, &self.recent_keys, self.next_seq - 1)?;
        tx.commit()?;
        self.keys_merged();
        // Outside a burst of appends the memory goes back.
        self.recent_keys.shrink_to_fit();
        Ok(())
    }

    /// After `write_keys` committed: every key up to the head is in `idem`.
    fn keys_merged(&mut self) {
        self.recent_keys.clear();
        self.idem_upto = self.next_seq - 1;
    }

    /// Appends one request's records in their own transaction (tools, tests).
    pub fn append(&mut self, records: Vec<NewRecord>) -> Result<Vec<AppendOutcome>, WalError> {
        let mut res = self.write(&[WriteOp::Append(records)])?;
        match res.pop() {
            Some(Ok(WriteResult::Appended(o))) => Ok(o),
            Some(Err(e)) => Err(e),
            _ => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;
    use crate::wal::engine::test_record;
    use crate::wal::WalConfig;

    fn open(dir: &tempfile::TempDir) -> Wal {
        Wal::open(WalConfig::new(dir.path().join("wal.db"), &["a"])).expect("open")
    }

    fn outcome(wal: &mut Wal, key: &str) -> AppendOutcome {
        wal.append(vec![test_record(key)])
            .expect("append")
            .remove(0)
    }

    /// (rows of `idem`, `meta.idem_upto`), read as another connection would.
    fn idem_on_disk(dir: &tempfile::TempDir) -> (u64, u64) {
        let conn = Connection::open(dir.path().join("wal.db")).unwrap();
        let rows = conn
            .query_row("SELECT COUNT(*) FROM idem", [], |r| r.get(0))
            .unwrap();
        let upto = conn
            .query_row(
                "SELECT COALESCE((SELECT value FROM meta WHERE key = 'idem_upto'), 0)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (rows, upto)
    }

    #[test]
    fn a_key_is_a_duplicate_in_memory_after_a_merge_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(&dir);
        let original = |seq| AppendOutcome::Duplicate {
            seq,
            correlation_id: format!("c-k{seq}"),
        };
        // A group that repeats a key of its own.
        let out = wal
            .append(vec![test_record("k1"), test_record("k1")])
            .unwrap();
        assert_eq!(out[1], original(1));
        assert_eq!(outcome(&mut wal, "k2"), AppendOutcome::Appended { seq: 2 });
        assert_eq!(outcome(&mut wal, "k2"), original(2), "held in memory");
        assert_eq!(idem_on_disk(&dir), (0, 0), "nothing merged yet");

        // Keys held in memory are read back from the records at open.
        drop(wal);
        let mut wal = open(&dir);
        assert_eq!(outcome(&mut wal, "k1"), original(1), "after a restart");

        wal.merge_keys().unwrap();
        assert_eq!(idem_on_disk(&dir), (2, 2));
        assert!(wal.recent_keys.is_empty());
        assert_eq!(outcome(&mut wal, "k2"), original(2), "merged");
        assert_eq!(outcome(&mut wal, "k3"), AppendOutcome::Appended { seq: 3 });
        drop(wal);
        let mut wal = open(&dir);
        assert_eq!(wal.recent_keys.len(), 1, "only k3 is read back");
        for (key, seq) in [("k1", 1), ("k2", 2), ("k3", 3)] {
            assert_eq!(
                outcome(&mut wal, key),
                original(seq),
                "{key} after a restart"
            );
        }
    }

    #[test]
    fn a_group_commit_merges_the_keys_once_enough_are_held_and_they_still_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(&dir);
        let mut seq = 0;
        while idem_on_disk(&dir).1 == 0 {
            let recs: Vec<NewRecord> = (0..500)
                .map(|_| {
                    seq += 1;
                    test_record(&format!("k{seq}"))
                })
                .collect();
            wal.append(recs).unwrap();
            assert!(
                seq <= MERGE_KEYS_AT as u64 + 500,
                "no merge after {seq} keys"
            );
        }
        assert!(seq >= MERGE_KEYS_AT as u64);
        assert_eq!(idem_on_disk(&dir), (seq, seq));
        assert!(wal.recent_keys.is_empty());
        for k in [1, seq / 2, seq] {
            assert!(
                matches!(outcome(&mut wal, &format!("k{k}")), AppendOutcome::Duplicate { seq: s, .. } if s == k),
                "k{k}"
            );
        }
    }

    #[test]
    fn an_idle_writer_merges_the_keys_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(&dir);
        outcome(&mut wal, "k1");
        wal.merge_keys_if_idle().unwrap();
        assert_eq!(idem_on_disk(&dir), (0, 0), "appends have not paused yet");
        wal.last_append = Instant::now() - MERGE_KEYS_IDLE;
        wal.merge_keys_if_idle().unwrap();
        assert_eq!(idem_on_disk(&dir), (1, 1));
        assert_eq!(wal.recent_keys.capacity(), 0, "its memory is freed");
        assert!(matches!(
            outcome(&mut wal, "k1"),
            AppendOutcome::Duplicate { seq: 1, .. }
        ));
    }

    #[test]
    fn a_wal_of_schema_2_moves_its_dedup_index_to_the_idem_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(&dir);
        for k in ["k1", "k2", "k3"] {
            outcome(&mut wal, k);
        }
        drop(wal);
        // What schema 2 left: an index on records.idem_key, no idem table.
        let conn = Connection::open(dir.path().join("wal.db")).unwrap();
        conn.execute_batch(
            "DROP TRIGGER records_forget_idem; DROP TABLE idem; DELETE FROM meta WHERE key = 'idem_upto';
             CREATE INDEX records_idem ON records(idem_key);
             UPDATE meta SET value = 2 WHERE key = 'schema_version';",
        )
        .unwrap();
        drop(conn);

        let mut wal = open(&dir);
        assert_eq!(idem_on_disk(&dir), (3, 3));
        assert!(wal.recent_keys.is_empty());
        let conn = Connection::open(dir.path().join("wal.db")).unwrap();
        let index: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'records_idem'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        assert_eq!(index, None, "the old index is dropped");
        assert!(matches!(
            outcome(&mut wal, "k2"),
            AppendOutcome::Duplicate { seq: 2, .. }
        ));
        assert!(wal.check(false).unwrap().problems.is_empty());
    }

    #[test]
    fn a_failed_group_commit_forgets_the_keys_it_would_have_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(&dir);
        outcome(&mut wal, "k1");
        // The second record of the next group fails: the group rolls back.
        wal.conn
            .execute_batch(
                "CREATE TEMP TRIGGER boom BEFORE INSERT ON records WHEN NEW.idem_key = 'boom'
                 BEGIN SELECT RAISE(ABORT, 'boom'); END;",
            )
            .unwrap();
        assert!(wal
            .append(vec![test_record("k2"), test_record("boom")])
            .is_err());
        assert_eq!(wal.recent_keys.len(), 1, "k2 was not stored");
        wal.conn.execute_batch("DROP TRIGGER boom").unwrap();
        // Seq 2 goes to another key; k2 is new, not a duplicate of it.
        assert_eq!(outcome(&mut wal, "k9"), AppendOutcome::Appended { seq: 2 });
        assert_eq!(outcome(&mut wal, "k2"), AppendOutcome::Appended { seq: 3 });
    }
}
