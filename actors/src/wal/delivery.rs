//! Delivery per sink: fetch, ack, dead and release, on each sink's
//! [`SinkState`]; acknowledgements held in memory and stored later
//! (`wal.ack_flush`). What the WAL counts (stats, the backlog per class)
//! is `stats.rs`.

use std::time::Duration;

use rusqlite::{params, OptionalExtension};

use super::engine::{
    now_ms, splice_record, Batch, Fetched, StoredRecord, Wal, WriteOp, WriteResult,
};
use super::error::WalError;
use super::ranges::RangeSet;
use super::sink_state::{held_acks_due, persist_dirty, SinkState};
use crate::route::{Class, DrainMode, SinkPolicy};

impl Wal {
    /// Marks `ranges` delivered for `sink` (tools, tests).
    pub fn ack(&mut self, sink: &str, ranges: &[(u64, u64)]) -> Result<(), WalError> {
        let op = WriteOp::Ack {
            sink: sink.to_string(),
            ranges: ranges.to_vec(),
            reduce: Vec::new(),
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

    /// `sink`'s reduction state rows (device → JSON) as of its last
    /// acknowledgement, including those held in memory with acks not stored
    /// yet: the state that goes with the acks the WAL has.
    pub fn reduce_rows(&self, sink: &str) -> Result<Vec<(String, String)>, WalError> {
        let st = self
            .sinks
            .get(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))?;
        let mut q = self
            .conn
            .prepare_cached("SELECT device, state FROM sink_reduce WHERE sink = ?1")?;
        let mut rows: std::collections::BTreeMap<String, String> = q
            .query_map([sink], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (device, state) in &st.reduce {
            match state {
                Some(s) => rows.insert(device.clone(), s.clone()),
                None => rows.remove(device),
            };
        }
        Ok(rows.into_iter().collect())
    }

    /// Puts InFlight `ranges` back to Enqueued (a failed or abandoned batch).
    pub fn release(&mut self, sink: &str, ranges: &[(u64, u64)]) -> Result<(), WalError> {
        let st = self.sink_mut(sink)?;
        for &(a, b) in ranges {
            st.inflight.remove(a, b);
        }
        st.hint = [0; 3];
        Ok(())
    }

    /// Puts everything InFlight for `sink` back to Enqueued (its dispatcher restarted).
    pub fn release_all(&mut self, sink: &str) -> Result<(), WalError> {
        let st = self.sink_mut(sink)?;
        st.inflight = RangeSet::new();
        st.hint = [0; 3];
        Ok(())
    }

    /// Sets a sink's route, TTLs and drain order (at start and at run time).
    /// The route applies to records stored from now on; that is the
    /// router's business: here it only matters for replay.
    pub fn set_policy(&mut self, sink: &str, policy: SinkPolicy) -> Result<(), WalError> {
        self.sink_mut(sink)?.policy = policy;
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

    /// Records above the cursor that are neither finished nor InFlight.
    pub(super) fn enqueued_count(&self, st: &SinkState) -> u64 {
        let head = self.head();
        if head <= st.cursor {
            return 0;
        }
        (head - st.cursor).saturating_sub(st.excluded().len())
    }

    /// Takes up to `max_records` Enqueued records for `sink` and marks them
    /// InFlight: `high` before `normal` before `low`, and within a class in
    /// seq order (with `live_first` and a backlog older than `live_after`:
    /// the live records of a class first, then its backlog). Records the
    /// sink's route did not take are finished for it on the way, unless a
    /// requeue or replay reopened them for it. With `max_wait`, returns
    /// `None` while fewer than `max_records` are waiting and the oldest of
    /// them is younger than `max_wait` (so batches fill up under load and
    /// still leave on time).
    pub fn fetch(
        &mut self,
        sink: &str,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Batch>, WalError> {
        Ok(match self.fetch_or_wait(sink, max_records, max_wait)? {
            Fetched::Batch(b) => Some(b),
            Fetched::Nothing | Fetched::Wait { .. } => None,
        })
    }

    /// [`Wal::fetch`], saying why there is no batch: nothing to send, or
    /// a partial batch whose oldest record may wait this much longer.
    pub fn fetch_or_wait(
        &mut self,
        sink: &str,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Fetched, WalError> {
        let max_records = max_records.max(1);
        let head = self.head();
        let st = self
            .sinks
            .get(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))?;
        let available = self.enqueued_count(st);
        if available == 0 {
            return Ok(Fetched::Nothing);
        }
        if (available as usize) < max_records && !max_wait.is_zero() {
            if let Some(ms) = self.receive_ms_from(Self::first_enqueued(st))? {
                let age = now_ms() - ms;
                let wait = max_wait.as_millis() as i64;
                if age < wait {
                    return Ok(Fetched::Wait {
                        after: Duration::from_millis((wait - age) as u64),
                        missing: max_records as u64 - available,
                    });
                }
            }
        }
        let cursor = st.cursor;
        let regions = match self.live_boundary(st, head)? {
            // Live records first, then the backlog below them.
            Some(live) => vec![(live - 1, head), (cursor, live - 1)],
            None => vec![(cursor, head)],
        };
        let mut pick = Pick {
            max: max_records,
            bit: 1u64 << st.bit,
            excluded: st.excluded(),
            forced: st.forced.clone(),
            ..Pick::default()
        };
        let mut hints = st.hint;
        for class in Class::ALL {
            for &(lo, hi) in &regions {
                if pick.records.len() >= max_records {
                    break;
                }
                let from = lo.max(hints[class as usize]);
                let reached = if class == Class::Normal {
                    self.pick_in_order(&mut pick, from, hi)?
                } else {
                    self.pick_class(&mut pick, class, from, hi)?
                };
                // Everything of the class up to `reached` is now taken,
                // finished, InFlight or not this sink's: the next scan may
                // start there, if this one started at or below the hint.
                if lo <= hints[class as usize].max(cursor) {
                    hints[class as usize] = hints[class as usize].max(reached);
                }
            }
        }
        let st = self.sink_mut(sink)?;
        st.hint = hints;
        for &(a, b) in pick.finished.ranges() {
            st.finish(a, b);
        }
        if pick.records.is_empty() {
            return Ok(Fetched::Nothing);
        }
        for &(a, b) in pick.taken.ranges() {
            st.inflight.insert(a, b);
        }
        Ok(Fetched::Batch(Batch {
            sink: sink.to_string(),
            ranges: pick.taken.ranges().to_vec(),
            records: pick.records,
        }))
    }

    /// The receive time of the first stored record at or above `seq`.
    fn receive_ms_from(&self, seq: u64) -> Result<Option<i64>, WalError> {
        Ok(self
            .conn
            .prepare_cached("SELECT receive_ms FROM records WHERE seq >= ?1 ORDER BY seq LIMIT 1")?
            .query_row([seq], |r| r.get(0))
            .optional()?)
    }

    /// With `live_first`, when the oldest Enqueued record is older than
    /// `live_after`: the first seq received since then (found by binary
    /// search: receive times grow with seq, give or take the few ms that
    /// concurrent requests race). `None`: plain order.
    fn live_boundary(&self, st: &SinkState, head: u64) -> Result<Option<u64>, WalError> {
        if st.policy.drain != DrainMode::LiveFirst {
            return Ok(None);
        }
        let cutoff = now_ms() - st.policy.live_after.as_millis() as i64;
        let first = Self::first_enqueued(st);
        match self.receive_ms_from(first)? {
            Some(ms) if ms < cutoff => {}
            _ => return Ok(None),
        }
        let (mut lo, mut hi) = (first, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.receive_ms_from(mid)? {
                Some(ms) if ms < cutoff => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok((lo <= head).then_some(lo))
    }

    /// Takes, in seq order from above `from` up to `hi`, every Enqueued
    /// `high` or `normal` record routed to the sink; finishes the records its
    /// route did not take; leaves `low` ones for their own pass. Returns the
    /// highest seq it judged.
    fn pick_in_order(&self, pick: &mut Pick, from: u64, hi: u64) -> Result<u64, WalError> {
        let mut q = self.conn.prepare_cached(
            "SELECT seq, device_id, idem_key, receive_ms, body, correlation_id, class, sinks \
             FROM records WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        )?;
        let mut reached = from;
        for (a, b) in pick.excluded.gaps(from, hi) {
            let mut pos = a - 1; // judged up to here
            loop {
                let want = pick.max - pick.records.len();
                if want == 0 {
                    return Ok(reached);
                }
                let limit = want + 256;
                let mut rows = q.query(params![pos, b, limit as i64])?;
                let mut n = 0usize;
                while let Some(r) = rows.next()? {
                    n += 1;
                    let seq: u64 = r.get(0)?;
                    if seq > pos + 1 {
                        // No record there (compacted while finished): nothing to deliver.
                        pick.finished.insert(pos + 1, seq - 1);
                    }
                    let class = Class::from_code(r.get(6)?);
                    let routed = pick.routed(seq, r.get(7)?);
                    if !routed {
                        pick.finished.insert(seq, seq);
                    } else if class != Class::Low {
                        pick.take(stored_record(r, seq, class)?);
                    }
                    pos = seq;
                    reached = seq;
                    if pick.records.len() >= pick.max {
                        return Ok(reached);
                    }
                }
                if n < limit {
                    if pos < b {
                        pick.finished.insert(pos + 1, b);
                    }
                    reached = b;
                    break;
                }
            }
        }
        Ok(reached.max(hi))
    }

    /// Takes, in seq order from above `from` up to `hi`, the Enqueued records
    /// of `class` (`high` or `low`, found through their index) routed to the
    /// sink. Returns the highest seq it judged.
    fn pick_class(
        &self,
        pick: &mut Pick,
        class: Class,
        from: u64,
        hi: u64,
    ) -> Result<u64, WalError> {
        // `class <> 1` lets SQLite use the partial index records_prio.
        let mut q = self.conn.prepare_cached(
            "SELECT seq, device_id, idem_key, receive_ms, body, correlation_id, class, sinks \
             FROM records WHERE class <> 1 AND class = ?4 AND seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        )?;
        let mut pos = from;
        loop {
            let want = pick.max - pick.records.len();
            if want == 0 {
                return Ok(pos);
            }
            let limit = want + 256;
            let mut rows = q.query(params![pos, hi, limit as i64, class.code()])?;
            let mut n = 0usize;
            while let Some(r) = rows.next()? {
                n += 1;
                let seq: u64 = r.get(0)?;
                pos = seq;
                if !pick.excluded.contains(seq) && pick.routed(seq, r.get(7)?) {
                    pick.take(stored_record(r, seq, class)?);
                    if pick.records.len() >= pick.max {
                        return Ok(pos);
                    }
                }
            }
            if n < limit {
                return Ok(hi);
            }
        }
    }
}

/// What one fetch has picked so far.
#[derive(Default)]
struct Pick {
    max: usize,
    /// The sink's bit.
    bit: u64,
    /// Finished or InFlight for the sink.
    excluded: RangeSet,
    /// Reopened by requeue or replay: the sink's whatever the route says.
    forced: RangeSet,
    records: Vec<StoredRecord>,
    /// Seqs of `records`.
    taken: RangeSet,
    /// Not the sink's (its route did not take them): finished at once.
    finished: RangeSet,
}

impl Pick {
    fn routed(&self, seq: u64, sinks: Option<i64>) -> bool {
        sinks.is_none_or(|s| s as u64 & self.bit != 0) || self.forced.contains(seq)
    }

    fn take(&mut self, rec: StoredRecord) {
        self.taken.insert(rec.seq, rec.seq);
        // A later pass of the same fetch must not take it again.
        self.excluded.insert(rec.seq, rec.seq);
        self.records.push(rec);
    }
}

/// A record from a row of `SELECT seq, device_id, idem_key, receive_ms, body, correlation_id, …`.
fn stored_record(r: &rusqlite::Row<'_>, seq: u64, class: Class) -> rusqlite::Result<StoredRecord> {
    let body: String = r.get(4)?;
    Ok(StoredRecord {
        seq,
        device_id: r.get(1)?,
        idempotency_key: r.get(2)?,
        receive_ms: r.get(3)?,
        correlation_id: r.get(5)?,
        class,
        json: splice_record(seq, &body),
    })
}

/// Reads one sink's delivery state; a sink without a row starts at `head`
/// (documented in the module doc) and gets its row.
impl Wal {
    /// Every sink's delivery state was committed as it is in memory.
    pub(super) fn sinks_stored(&mut self) {
        for st in self.sinks.values_mut() {
            if st.dirty {
                st.mark_persisted();
            }
        }
        self.unstored_since = None;
    }

    /// Acknowledgements waited in memory for `ack_flush` (or it is zero):
    /// the next commit stores them.
    pub(super) fn acks_due(&self) -> bool {
        held_acks_due(self.unstored_since, self.cfg.ack_flush)
    }

    /// How long until acknowledgements held in memory are due to be
    /// stored (`None`: none are held).
    pub fn acks_due_in(&self) -> Option<Duration> {
        self.unstored_since
            .map(|t| self.cfg.ack_flush.saturating_sub(t.elapsed()))
    }

    /// Stores the acknowledgements held in memory now, in a commit of their
    /// own without an fsync: losing it to a power cut only delivers those
    /// records again, and the next append's fsync (or a checkpoint) makes it
    /// durable. The writer calls it once they are due and when it stops;
    /// the consistency check before it reads the stored state. (Operator
    /// commands work on the state in memory and store their sink's.)
    pub fn flush_acks(&mut self) -> Result<(), WalError> {
        if self.unstored_since.is_none() && !self.sinks.values().any(|s| s.dirty) {
            return Ok(());
        }
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let res = (|| {
            let tx = self.conn.transaction()?;
            persist_dirty(&tx, &self.sinks)?;
            tx.commit()?;
            Ok::<_, WalError>(())
        })();
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        res?;
        self.sinks_stored();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::engine::test_record;
    use crate::wal::{AppendOutcome, WalConfig};

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
    fn reduction_rows_are_stored_with_the_ack_they_came_with_and_lost_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.ack_flush = Duration::from_secs(3600);
        let mut wal = Wal::open(cfg.clone()).unwrap();
        wal.append((0..4).map(|i| test_record(&format!("r{i}"))).collect())
            .unwrap();
        let ack = |ranges: Vec<(u64, u64)>, rows: &[(&str, Option<&str>)]| WriteOp::Ack {
            sink: "a".into(),
            ranges,
            reduce: rows
                .iter()
                .map(|(d, s)| (d.to_string(), s.map(str::to_string)))
                .collect(),
        };
        let row = |d: &str, s: &str| (d.to_string(), s.to_string());
        wal.write(&[ack(vec![(1, 2)], &[("d", Some("s1")), ("e", Some("e1"))])])
            .unwrap();
        wal.flush_acks().unwrap();
        // Held in memory with its ack (ack_flush): read back, not stored.
        wal.write(&[ack(vec![(3, 4)], &[("d", Some("s2")), ("e", None)])])
            .unwrap();
        assert_eq!(wal.reduce_rows("a").unwrap(), [row("d", "s2")]);
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 4);
        // A crash loses the ack and the rows together.
        drop(wal);
        let mut wal = Wal::open(cfg.clone()).unwrap();
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 2);
        assert_eq!(
            wal.reduce_rows("a").unwrap(),
            [row("d", "s1"), row("e", "e1")]
        );
        // Stored, they come back together.
        wal.write(&[ack(vec![(3, 4)], &[("d", Some("s2")), ("e", None)])])
            .unwrap();
        wal.flush_acks().unwrap();
        drop(wal);
        let wal = Wal::open(cfg).unwrap();
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 4);
        assert_eq!(wal.reduce_rows("a").unwrap(), [row("d", "s2")]);
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

    #[test]
    fn a_partial_batch_says_how_long_it_may_still_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(WalConfig::new(dir.path().join("wal.db"), &["a"])).unwrap();
        let max_wait = Duration::from_secs(60);
        assert_eq!(
            wal.fetch_or_wait("a", 10, max_wait).unwrap(),
            Fetched::Nothing
        );
        wal.append(vec![test_record("x")]).unwrap();
        match wal.fetch_or_wait("a", 10, max_wait).unwrap() {
            Fetched::Wait { after: d, .. } => assert!(
                d <= max_wait && d > max_wait - Duration::from_secs(10),
                "{d:?}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            wal.fetch_or_wait("a", 10, Duration::ZERO).unwrap(),
            Fetched::Batch(_)
        ));
        assert_eq!(
            wal.fetch_or_wait("a", 10, max_wait).unwrap(),
            Fetched::Nothing
        );
    }
}
