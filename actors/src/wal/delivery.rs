//! Per-sink delivery state: a cursor plus finished ranges above it, stored
//! and in memory; fetch, ack, dead, release and the stats per sink.

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::engine::{
    now_ms, splice_record, Batch, SinkStats, StoredRecord, Wal, WalError, WalStats, WriteOp,
    WriteResult,
};
use super::ranges::RangeSet;

#[derive(Debug, Default, Clone)]
pub(super) struct SinkState {
    pub(super) cursor: u64,
    pub(super) done: RangeSet,
    pub(super) inflight: RangeSet,
    pub(super) dead_count: u64,
    /// The stored cursor/done rows are behind the in-memory state.
    pub(super) dirty: bool,
    /// The cursor and done ranges as last committed to disk (`None`:
    /// unknown, rewrite them whole). Lets a commit write only the ranges
    /// that changed: after a requeue of scattered dead letters a sink can
    /// hold tens of thousands of ranges.
    pub(super) stored: Option<(u64, RangeSet)>,
}

impl SinkState {
    pub(super) fn finish(&mut self, first: u64, last: u64) {
        self.inflight.remove(first, last);
        let first = first.max(self.cursor + 1);
        if first > last {
            return;
        }
        self.done.insert(first, last);
        while let Some(end) = self.done.pop_contiguous(self.cursor + 1) {
            self.cursor = self.cursor.max(end);
        }
        self.dirty = true;
    }

    /// The state was committed as it is in memory.
    pub(super) fn mark_persisted(&mut self) {
        self.dirty = false;
        self.stored = Some((self.cursor, self.done.clone()));
    }

    pub(super) fn excluded(&self) -> RangeSet {
        self.done.union(&self.inflight)
    }
}

impl Wal {
    /// Marks `ranges` delivered for `sink` (tools, tests).
    pub fn ack(&mut self, sink: &str, ranges: &[(u64, u64)]) -> Result<(), WalError> {
        let op = WriteOp::Ack {
            sink: sink.to_string(),
            ranges: ranges.to_vec(),
        };
        self.write(&[op])?
            .pop()
            .unwrap_or(Ok(WriteResult::Done))
            .map(|_| ())
    }

    /// Dead-letters `ranges` for `sink` (tools, tests).
    pub fn dead(
        &mut self,
        sink: &str,
        ranges: &[(u64, u64)],
        error: &str,
        attempts: u32,
    ) -> Result<(), WalError> {
        let op = WriteOp::Dead {
            sink: sink.to_string(),
            ranges: ranges.to_vec(),
            error: error.to_string(),
            attempts,
        };
        self.write(&[op])?
            .pop()
            .unwrap_or(Ok(WriteResult::Done))
            .map(|_| ())
    }

    /// Puts InFlight `ranges` back to Enqueued (a failed or abandoned batch).
    pub fn release(&mut self, sink: &str, ranges: &[(u64, u64)]) -> Result<(), WalError> {
        let st = self.sink_mut(sink)?;
        for &(a, b) in ranges {
            st.inflight.remove(a, b);
        }
        Ok(())
    }

    /// Puts everything InFlight for `sink` back to Enqueued (its dispatcher restarted).
    pub fn release_all(&mut self, sink: &str) -> Result<(), WalError> {
        self.sink_mut(sink)?.inflight = RangeSet::new();
        Ok(())
    }

    /// The lowest seq above the cursor that is neither finished nor InFlight.
    fn first_enqueued(st: &SinkState) -> u64 {
        let mut pos = st.cursor + 1;
        for &(a, b) in st.excluded().ranges() {
            if a <= pos && pos <= b {
                pos = b + 1;
            }
        }
        pos
    }

    fn enqueued_count(&self, st: &SinkState) -> u64 {
        let head = self.head();
        if head <= st.cursor {
            return 0;
        }
        (head - st.cursor).saturating_sub(st.excluded().len())
    }

    /// Takes up to `max_records` Enqueued records for `sink` in seq order and
    /// marks them InFlight. With `max_wait`, returns `None` while fewer than
    /// `max_records` are waiting and the oldest of them is younger than
    /// `max_wait` (so batches fill up under load and still leave on time).
    pub fn fetch(
        &mut self,
        sink: &str,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Batch>, WalError> {
        let max_records = max_records.max(1);
        let head = self.head();
        let st = self
            .sinks
            .get(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))?;
        let available = self.enqueued_count(st);
        if available == 0 {
            return Ok(None);
        }
        if (available as usize) < max_records && !max_wait.is_zero() {
            let first = Self::first_enqueued(st);
            let oldest: Option<i64> = self
                .conn
                .prepare_cached(
                    "SELECT receive_ms FROM records WHERE seq >= ?1 ORDER BY seq LIMIT 1",
                )?
                .query_row([first], |r| r.get(0))
                .optional()?;
            if let Some(ms) = oldest {
                if now_ms() - ms < max_wait.as_millis() as i64 {
                    return Ok(None);
                }
            }
        }
        let excluded = st.excluded();
        let mut records = Vec::with_capacity(max_records.min(available as usize));
        let mut claimed = Vec::new();
        let mut pos = st.cursor; // exclusive lower bound
        let mut q = self.conn.prepare_cached(
            "SELECT seq, device_id, idem_key, receive_ms, body, correlation_id FROM records WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        )?;
        let mut ex_iter = excluded.ranges().iter().peekable();
        while records.len() < max_records && pos < head {
            // Skip excluded ranges at or below pos.
            while let Some(&&(_, b)) = ex_iter.peek() {
                if b <= pos {
                    ex_iter.next();
                } else {
                    break;
                }
            }
            let (upper, next_pos) = match ex_iter.peek() {
                Some(&&(a, b)) if a <= pos + 1 => {
                    pos = b;
                    ex_iter.next();
                    continue;
                }
                Some(&&(a, b)) => (a - 1, Some(b)),
                None => (head, None),
            };
            let want = max_records - records.len();
            let rows = q.query_map(params![pos, upper, want as i64], |r| {
                let seq: u64 = r.get(0)?;
                let body: String = r.get(4)?;
                Ok(StoredRecord {
                    seq,
                    device_id: r.get(1)?,
                    idempotency_key: r.get(2)?,
                    receive_ms: r.get(3)?,
                    correlation_id: r.get(5)?,
                    json: splice_record(seq, &body),
                })
            })?;
            let mut got = 0usize;
            let mut last = pos;
            for row in rows {
                let rec = row?;
                last = rec.seq;
                got += 1;
                records.push(rec);
            }
            if got == want {
                claimed.push((pos + 1, last));
                break;
            }
            // Everything in (pos, upper] was read: claim it whole, gaps included.
            if upper > pos {
                claimed.push((pos + 1, upper));
            }
            match next_pos {
                Some(b) => {
                    pos = b;
                    ex_iter.next();
                }
                None => break,
            }
        }
        drop(q);
        if records.is_empty() {
            return Ok(None);
        }
        let st = self.sink_mut(sink)?;
        for &(a, b) in &claimed {
            st.inflight.insert(a, b);
        }
        Ok(Some(Batch {
            sink: sink.to_string(),
            ranges: claimed,
            records,
        }))
    }

    /// Counts per sink and for the whole WAL.
    pub fn stats(&self) -> Result<WalStats, WalError> {
        let mut sinks = BTreeMap::new();
        let mut oldest_q = self
            .conn
            .prepare_cached("SELECT receive_ms FROM records WHERE seq > ?1 ORDER BY seq LIMIT 1")?;
        for (name, st) in &self.sinks {
            let mut pending_from = st.cursor;
            if let Some(&(a, b)) = st.done.ranges().first() {
                if a == st.cursor + 1 {
                    pending_from = b;
                }
            }
            let oldest = if self.head() > st.cursor {
                oldest_q
                    .query_row([pending_from], |r| r.get(0))
                    .optional()?
            } else {
                None
            };
            sinks.insert(
                name.clone(),
                SinkStats {
                    cursor: st.cursor,
                    enqueued: self.enqueued_count(st),
                    inflight: st.inflight.len(),
                    dead: st.dead_count,
                    oldest_pending_ms: oldest,
                },
            );
        }
        Ok(WalStats {
            head: self.head(),
            stored_records: self.stored_records,
            live_bytes: self.live_bytes,
            disk_free_bytes: self.disk_free,
            backpressure: self.backpressure.is_some(),
            sinks,
        })
    }
}

/// Reads one sink's delivery state; a sink without a row starts at `head`
/// (documented in the module doc) and gets its row.
pub(super) fn load_sink(conn: &Connection, name: &str, head: u64) -> Result<SinkState, WalError> {
    let cursor: Option<u64> = conn
        .query_row("SELECT cursor FROM sinks WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    let mut st = SinkState::default();
    match cursor {
        Some(c) => st.cursor = c,
        None => {
            st.cursor = head;
            conn.execute(
                "INSERT INTO sinks(name, cursor) VALUES(?1, ?2)",
                params![name, head],
            )?;
        }
    }
    let mut q = conn.prepare("SELECT first, last FROM sink_done WHERE sink = ?1")?;
    let rows = q.query_map([name], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))?;
    for row in rows {
        let (a, b) = row?;
        if a <= b {
            st.done.insert(a, b);
        }
    }
    st.done.remove_upto(st.cursor);
    while let Some(end) = st.done.pop_contiguous(st.cursor + 1) {
        st.cursor = st.cursor.max(end);
    }
    st.dead_count = conn.query_row("SELECT COUNT(*) FROM dead WHERE sink = ?1", [name], |r| {
        r.get(0)
    })?;
    Ok(st)
}

/// Stores one sink's cursor and done ranges as they are in memory: only
/// what changed since the last commit when that is known, else everything.
/// The caller calls `mark_persisted` once the transaction committed.
pub(super) fn persist_sink(conn: &Connection, name: &str, st: &SinkState) -> Result<(), WalError> {
    let Some((cursor, old)) = &st.stored else {
        conn.execute(
            "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
            params![name, st.cursor],
        )?;
        conn.execute("DELETE FROM sink_done WHERE sink = ?1", [name])?;
        let mut ins =
            conn.prepare_cached("INSERT INTO sink_done(sink, first, last) VALUES(?1, ?2, ?3)")?;
        for &(a, b) in st.done.ranges() {
            ins.execute(params![name, a, b])?;
        }
        return Ok(());
    };
    if *cursor != st.cursor {
        conn.execute(
            "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
            params![name, st.cursor],
        )?;
    }
    let (gone, added) = range_changes(old.ranges(), st.done.ranges());
    let mut del = conn.prepare_cached("DELETE FROM sink_done WHERE sink = ?1 AND first = ?2")?;
    for (a, _) in gone {
        del.execute(params![name, a])?;
    }
    let mut ins = conn
        .prepare_cached("INSERT OR REPLACE INTO sink_done(sink, first, last) VALUES(?1, ?2, ?3)")?;
    for (a, b) in added {
        ins.execute(params![name, a, b])?;
    }
    Ok(())
}

type Ranges = Vec<(u64, u64)>;

/// The ranges only in `old` and those only in `new` (both sorted), in one pass.
fn range_changes(old: &[(u64, u64)], new: &[(u64, u64)]) -> (Ranges, Ranges) {
    let (mut gone, mut added) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o == n => {
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.0 < n.0 || (o.0 == n.0 && o.1 != n.1) => {
                gone.push(*o);
                i += 1;
            }
            (Some(_), Some(n)) => {
                added.push(*n);
                j += 1;
            }
            (Some(o), None) => {
                gone.push(*o);
                i += 1;
            }
            (None, Some(n)) => {
                added.push(*n);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (gone, added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::engine::test_record;
    use crate::wal::{AppendOutcome, WalConfig};

    #[test]
    fn range_changes_lists_what_to_delete_and_insert() {
        let old = [(1, 2), (5, 7), (9, 9)];
        let new = [(1, 2), (5, 8), (12, 13)];
        let (gone, added) = range_changes(&old, &new);
        assert_eq!(gone, [(5, 7), (9, 9)]);
        assert_eq!(added, [(5, 8), (12, 13)]);
        assert_eq!(range_changes(&new, &new), (vec![], vec![]));
    }

    #[test]
    fn fetch_ack_and_restart_keep_delivery_state() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig::new(dir.path().join("wal.db"), &["a", "b"]);
        let mut wal = Wal::open(cfg.clone()).unwrap();
        let out = wal
            .append((0..10).map(|i| test_record(&format!("k{i}"))).collect())
            .unwrap();
        assert_eq!(out[0], AppendOutcome::Appended { seq: 1 });
        let b1 = wal.fetch("a", 4, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b1.ranges, vec![(1, 4)]);
        let b2 = wal.fetch("a", 4, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b2.ranges, vec![(5, 8)]);
        wal.ack("a", &b2.ranges).unwrap();
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 0);
        wal.ack("a", &b1.ranges).unwrap();
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 8);
        let b3 = wal.fetch("a", 10, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b3.ranges, vec![(9, 10)]);
        drop(wal);
        let mut wal = Wal::open(cfg).unwrap();
        let again = wal.fetch("a", 10, Duration::ZERO).unwrap().unwrap();
        assert_eq!(
            again.ranges,
            vec![(9, 10)],
            "InFlight goes back to Enqueued on restart"
        );
        assert_eq!(
            wal.fetch("b", 100, Duration::ZERO)
                .unwrap()
                .unwrap()
                .records
                .len(),
            10
        );
        let dup = wal.append(vec![test_record("k3")]).unwrap();
        assert_eq!(
            dup[0],
            AppendOutcome::Duplicate {
                seq: 4,
                correlation_id: "c-k3".into()
            }
        );
    }

    #[test]
    fn fetch_waits_for_a_full_batch_until_max_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(WalConfig::new(dir.path().join("wal.db"), &["a"])).unwrap();
        wal.append(vec![test_record("x")]).unwrap();
        assert!(wal
            .fetch("a", 10, Duration::from_secs(60))
            .unwrap()
            .is_none());
        assert!(wal
            .fetch("a", 1, Duration::from_secs(60))
            .unwrap()
            .is_some());
    }
}
