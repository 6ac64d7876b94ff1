//! Appends with dedup, and the group write: appends, acks, dead letters and
//! releases applied in one transaction with one commit (one fsync).

use rusqlite::{params, OptionalExtension};

use super::delivery::persist_sink;
use super::engine::{now_ms, AppendOutcome, NewRecord, Wal, WalError, WriteOp, WriteResult};
use super::ranges::RangeSet;
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
        let res = self.write_inner(ops);
        match res {
            Ok(out) => {
                // Every sink touched is now stored as it is in memory.
                for st in self.sinks.values_mut() {
                    if st.dirty {
                        st.mark_persisted();
                    }
                }
                Ok(out)
            }
            Err(e) => {
                // Rolled back: hand the seqs out again so none is skipped
                // (a gap above a cursor would never be acked).
                self.next_seq = seq_before;
                self.stored_records = stored_before;
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn write_inner(
        &mut self,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<WriteResult, WalError>>, WalError> {
        let window_start = now_ms() - self.cfg.dedup_window.as_millis() as i64;
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(ops.len());
        {
            let mut find = tx.prepare_cached(
                "SELECT seq, correlation_id, receive_ms FROM records WHERE idem_key = ?1 ORDER BY seq DESC LIMIT 1",
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
                            let prior: Option<(u64, String, i64)> = find
                                .query_row([&rec.idempotency_key], |r| {
                                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                                })
                                .optional()?;
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
                                    outcomes.push(AppendOutcome::Appended { seq });
                                }
                            }
                        }
                        out.push(Ok(WriteResult::Appended(outcomes)));
                    }
                    WriteOp::Ack { sink, ranges } => match self.sinks.get_mut(sink) {
                        None => out.push(Err(WalError::UnknownSink(sink.clone()))),
                        Some(st) => {
                            for &(a, b) in ranges {
                                st.finish(a, b);
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
            for (name, st) in &self.sinks {
                if st.dirty {
                    persist_sink(&tx, name, st)?;
                }
            }
        }
        tx.commit()?;
        Ok(out)
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
