//! Appends with dedup, and the group write: appends, acks, dead letters and
//! releases applied in one transaction with one commit (one fsync).

use std::hash::BuildHasher;
use std::time::Instant;

use rusqlite::{params, OptionalExtension};

use super::engine::{now_ms, AppendOutcome, NewRecord, Wal, WriteOp, WriteResult};
use super::error::WalError;
use super::idem::{write_keys, MERGE_KEYS_AT};
use super::ranges::RangeSet;
use super::sink_state::{held_acks_due, persist_dirty};
use super::space::COMPACT_CHUNK;

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
        undo: &mut Vec<(u64, Option<u64>)>,
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
                            let hash = self.key_hasher.hash_one(&rec.idempotency_key);
                            let held = match self.recent_keys.get(&hash) {
                                Some(&seq) => find_seq
                                    .query_row(params![seq, rec.idempotency_key], row)
                                    .optional()?,
                                None => None,
                            };
                            // Not held in memory (or another key of the same
                            // hash is): the `idem` table knows.
                            let prior: Option<(u64, String, i64)> = match held {
                                Some(p) => Some(p),
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
                                    let before = self.recent_keys.insert(hash, seq);
                                    undo.push((hash, before));
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
            write_keys(&tx, self.idem_upto, self.next_seq - 1)?;
        }
        tx.commit()?;
        if merged {
            self.keys_merged();
        }
        Ok((out, store))
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
    use super::*;
    use crate::wal::engine::{test_append as outcome, test_record, test_wal as open};

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
