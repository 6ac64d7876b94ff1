//! Space: the size counted against `wal.max_bytes`, free disk, backpressure,
//! and compaction (retention, making room at the size limit, `drop_oldest`).

use std::path::Path;

use rusqlite::{params, OptionalExtension};

use super::engine::{write_meta, BackpressurePolicy, Wal};
use super::error::WalError;
use super::idem::IDEM_STALE;

/// The writer's automatic checkpoint: only a burst reaches it
/// ([`Wal::defer_auto_checkpoint`]).
const AUTO_CHECKPOINT_PAGES: i64 = 4096;

/// The longest a record past retention waits for the others of its batch.
const RETENTION_BATCH_MAX_MS: i64 = 60_000;

/// Records compacted per step (keeps commit latency low).
pub(crate) const COMPACT_CHUNK: usize = 5000;

fn free_disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return u64::MAX;
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string for the duration of the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) == 0 {
            (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
        } else {
            u64::MAX
        }
    }
}

impl Wal {
    /// Re-reads the database size and free disk space and re-evaluates
    /// backpressure.
    ///
    /// The size counted against `max_bytes` is the database pages that hold
    /// data (pages less the free list). SQLite's `-wal` journal is not: its
    /// pages are copies that checkpoints fold back in, and it is bounded on
    /// its own (`journal_size_limit`, periodic checkpoints).
    pub fn refresh_space(&mut self) -> Result<(), WalError> {
        let page_size: u64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages: u64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: u64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        self.live_bytes = pages.saturating_sub(free) * page_size;
        let dir = self
            .cfg
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        self.disk_free = free_disk_bytes(dir);
        self.backpressure = if self.disk_free < self.cfg.min_free_disk_bytes {
            Some(format!(
                "free disk {} bytes is below wal.min_free_disk_bytes {}",
                self.disk_free, self.cfg.min_free_disk_bytes
            ))
        } else if self.live_bytes > self.cfg.max_bytes
            && self.cfg.policy == BackpressurePolicy::Block
        {
            Some(format!(
                "WAL holds {} bytes of records that a sink still needs, above wal.max_bytes {}",
                self.live_bytes, self.cfg.max_bytes
            ))
        } else {
            None
        };
        Ok(())
    }

    /// Above this size delivered records give way before their retention
    /// ends, so that a WAL at its limit with healthy sinks keeps headroom
    /// for new data: 90 % of `max_bytes`.
    fn room_mark(&self) -> u64 {
        self.cfg.max_bytes / 10 * 9
    }

    /// One step of housekeeping: compacts up to `chunk` records that every
    /// sink finished and that are past retention; above the room mark (90 %
    /// of `max_bytes`) also compacts delivered records still in retention,
    /// chunk by chunk, until the WAL is back under the mark or nothing
    /// delivered is left; under `drop_oldest` drops up to `chunk` of the
    /// oldest records while over `max_bytes`. Returns (compacted, dropped).
    /// On `Ok` the size, free disk and backpressure are fresh.
    pub fn compact(&mut self, now: i64, chunk: usize) -> Result<(u64, u64), WalError> {
        self.compact_with(now, chunk, true)
    }

    /// [`Self::compact`]; without `batched`, records past retention go at
    /// once (an operator's `compact_now`).
    pub(super) fn compact_with(
        &mut self,
        now: i64,
        chunk: usize,
        batched: bool,
    ) -> Result<(u64, u64), WalError> {
        let keep = self.cfg.retention.max(self.cfg.dedup_window).as_millis() as i64;
        // Past retention, records go in batches: one commit a minute at
        // most (a record is kept up to 1 % of retention longer), not one a
        // housekeeping pass for the few that aged since the last.
        let batch = if batched {
            (keep / 100).min(RETENTION_BATCH_MAX_MS)
        } else {
            0
        };
        let mut compacted = self.compact_delivered(now - keep, now - keep - batch, chunk)?;
        // Room is made on the size as it is now: appends since the last
        // refresh may have crossed the mark.
        self.refresh_space()?;
        compacted += self.make_room(chunk)?;

        let mut dropped = 0;
        if self.cfg.policy == BackpressurePolicy::DropOldest && self.live_bytes > self.cfg.max_bytes
        {
            let upto: Option<u64> = self.conn.query_row(
                "SELECT MAX(seq) FROM (SELECT seq FROM records ORDER BY seq LIMIT ?1)",
                [chunk as i64],
                |r| r.get(0),
            )?;
            if let Some(upto) = upto {
                self.merge_keys_upto(upto)?;
                let tx = self.conn.transaction()?;
                dropped = tx.execute("DELETE FROM records WHERE seq <= ?1", [upto])? as u64;
                write_meta(&tx, IDEM_STALE, self.idem_stale + dropped)?;
                tx.execute("DELETE FROM dead WHERE seq <= ?1", [upto])?;
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES('seq_floor', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, ?1)",
                    [upto],
                )?;
                for (name, st) in self.sinks.iter_mut() {
                    if st.cursor < upto {
                        st.cursor = upto;
                        st.done.remove_upto(upto);
                        st.inflight.remove_upto(upto);
                        while let Some(end) = st.done.pop_contiguous(st.cursor + 1) {
                            st.cursor = st.cursor.max(end);
                        }
                        tx.execute(
                            "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
                            params![name, st.cursor],
                        )?;
                        tx.execute(
                            "DELETE FROM sink_done WHERE sink = ?1 AND last <= ?2",
                            params![name, st.cursor],
                        )?;
                        st.stored = None;
                    }
                }
                tx.commit()?;
                for (name, st) in self.sinks.iter_mut() {
                    st.dead_count = self.conn.query_row(
                        "SELECT COUNT(*) FROM dead WHERE sink = ?1",
                        [name],
                        |r| r.get(0),
                    )?;
                }
                self.stored_records = self.stored_records.saturating_sub(dropped);
                self.stale_counted(dropped);
                self.refresh_space()?;
            }
        }
        Ok((compacted, dropped))
    }

    /// Over the room mark, delivered records (finished by every sink, not
    /// dead) give way before their retention ends: replay history is worth
    /// less than accepting new data. Deletes them oldest first, `chunk` at a
    /// time, until the WAL is under the mark or nothing delivered is left.
    /// Returns how many it deleted.
    pub(super) fn make_room(&mut self, chunk: usize) -> Result<u64, WalError> {
        let mut total = 0;
        while self.live_bytes > self.room_mark() {
            let n = self.compact_delivered(i64::MAX, i64::MAX, chunk)?;
            if n == 0 {
                break;
            }
            total += n;
            self.refresh_space()?;
        }
        Ok(total)
    }

    /// Deletes up to `chunk` of the oldest records that every sink finished,
    /// that are not dead letters and that were received before `cutoff`
    /// (epoch ms), if the oldest record was received before `due` (at or
    /// before `cutoff`); moves the seq floor up. Returns how many it deleted.
    fn compact_delivered(&mut self, cutoff: i64, due: i64, chunk: usize) -> Result<u64, WalError> {
        // Mostly nothing is old enough: the oldest record says so from one
        // index lookup, where the scan below would read up to `chunk`
        // records every housekeeping pass.
        let oldest: Option<i64> = self
            .conn
            .prepare_cached("SELECT receive_ms FROM records ORDER BY seq LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()?;
        if oldest.is_none_or(|ms| ms >= due) {
            return Ok(0);
        }
        let min_cursor = self
            .sinks
            .values()
            .map(|s| s.cursor)
            .min()
            .unwrap_or_else(|| self.head());
        // Find the highest seq that is both finished everywhere and old
        // enough, and whether the oldest of those is due (the oldest record
        // above may be a dead letter, which stays).
        let (boundary, oldest): (Option<u64>, Option<i64>) = self.conn.query_row(
            "SELECT MAX(seq), MIN(receive_ms) FROM (SELECT seq, receive_ms FROM records WHERE seq <= ?1 AND seq NOT IN (SELECT seq FROM dead) ORDER BY seq LIMIT ?2) WHERE receive_ms < ?3",
            params![min_cursor, chunk as i64, cutoff],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (Some(upto), Some(oldest)) = (boundary, oldest) else {
            return Ok(0);
        };
        if oldest >= due {
            return Ok(0);
        }
        self.merge_keys_upto(upto)?;
        let tx = self.conn.transaction()?;
        let compacted = tx.execute(
            "DELETE FROM records WHERE seq <= ?1 AND seq NOT IN (SELECT seq FROM dead WHERE seq <= ?1)",
            [upto],
        )? as u64;
        write_meta(&tx, IDEM_STALE, self.idem_stale + compacted)?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES('seq_floor', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, ?1)",
            [upto],
        )?;
        // The cursors that allowed this may still be held in memory
        // (`ack_flush`): after a crash a stored cursor below `upto` finds no
        // record there, and its next fetch moves it past them.
        tx.commit()?;
        self.stored_records = self.stored_records.saturating_sub(compacted);
        self.stale_counted(compacted);
        Ok(compacted)
    }

    /// Leaves checkpoints to the checkpointer's thread
    /// ([`super::checkpoint`]): SQLite's automatic checkpoint on the
    /// writer's connection waits for 4,096 pages (8 MiB of 2 KiB pages)
    /// instead of 1,000, which a steady rate does not reach between two of
    /// the thread's passes (~3 MB at 1k records/s). It stays as the bound
    /// for a burst: appends at tens of thousands a second would otherwise
    /// fill the `-wal` file with hundreds of MB before the next pass, and
    /// every read (a sink's fetch) would search it.
    pub fn defer_auto_checkpoint(&mut self) -> Result<(), WalError> {
        self.conn
            .pragma_update(None, "wal_autocheckpoint", AUTO_CHECKPOINT_PAGES)?;
        Ok(())
    }

    /// Runs a passive checkpoint so the -wal file does not grow without bound.
    pub fn checkpoint(&mut self) -> Result<(), WalError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::wal::engine::test_record;
    use crate::wal::{now_ms, AppendOutcome, WalConfig};

    #[test]
    fn compaction_removes_only_records_every_sink_finished_keeps_dead_letters_and_never_reuses_seqs(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a", "b"]);
        cfg.retention = Duration::ZERO;
        cfg.dedup_window = Duration::ZERO;
        let mut wal = Wal::open(cfg.clone()).unwrap();
        wal.append((0..6).map(|i| test_record(&format!("k{i}"))).collect())
            .unwrap();
        let later = now_ms() + 1000;
        // Nothing is finished for "b": nothing may go.
        wal.ack("a", &[(1, 6)]).unwrap();
        assert_eq!(wal.compact(later, 100).unwrap(), (0, 0));
        // "b" finishes 1..=4 (3 as a dead letter); 5 and 6 stay pending.
        wal.ack("b", &[(1, 2), (4, 4)]).unwrap();
        wal.dead("b", &[(3, 3)], "refused", 3).unwrap();
        assert_eq!(
            wal.compact(later, 100).unwrap(),
            (3, 0),
            "1, 2 and 4 go; dead letter 3 stays"
        );
        let stats = wal.stats().unwrap();
        assert_eq!(stats.stored_records, 3);
        assert_eq!(stats.sinks["b"].dead, 1);
        assert_eq!(stats.sinks["b"].enqueued, 2);
        wal.ack("b", &[(5, 6)]).unwrap();
        assert_eq!(wal.compact(later, 100).unwrap(), (2, 0));
        drop(wal);
        let mut wal = Wal::open(cfg).unwrap();
        assert_eq!(wal.stats().unwrap().stored_records, 1);
        // seq 6 was compacted and was the highest: the next record still gets 7.
        assert_eq!(
            wal.append(vec![test_record("new")]).unwrap()[0],
            AppendOutcome::Appended { seq: 7 }
        );
    }

    /// A WAL at its size limit whose sink keeps up: delivered records (still
    /// in retention) make room, so no append is refused; a stalled sink does
    /// fill it, and then appends are refused.
    #[test]
    fn at_the_size_limit_delivered_records_make_room_and_only_pending_data_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.max_bytes = 512 << 10;
        cfg.min_free_disk_bytes = 0;
        let mut wal = Wal::open(cfg).unwrap();
        let blob = "x".repeat(1000);
        // Round r appends records k{10r} .. k{10r + 9} of ~1 KB each.
        let ten = |round: usize| -> Vec<_> {
            (round * 10..round * 10 + 10)
                .map(|i| {
                    let mut r = test_record(&format!("k{i}"));
                    r.body = format!("{{\"idempotency_key\":\"k{i}\",\"blob\":\"{blob}\"}}");
                    r
                })
                .collect()
        };
        // 4 MB through a 512 KiB WAL, acked as it goes; housekeeping (as the
        // writer thread runs it) every 10 rounds.
        for round in 0..400 {
            let out = wal.append(ten(round));
            assert!(
                out.is_ok(),
                "round {round}: {:?} (size {})",
                out,
                wal.live_bytes
            );
            let b = wal.fetch("a", 100, Duration::ZERO).unwrap().unwrap();
            wal.ack("a", &b.ranges).unwrap();
            if round % 10 == 0 {
                wal.compact(now_ms(), COMPACT_CHUNK).unwrap();
            }
        }
        assert!(
            wal.stats().unwrap().stored_records < 4000,
            "delivered records were compacted"
        );
        // Now the sink stops acking: pending data fills the WAL and refuses appends.
        let mut refused = None;
        for round in 400..800 {
            if let Err(e) = wal.append(ten(round)) {
                refused = Some(e);
                break;
            }
            if round % 10 == 0 {
                wal.compact(now_ms(), COMPACT_CHUNK).unwrap();
            }
        }
        assert!(
            matches!(refused, Some(WalError::Backpressure(_))),
            "pending data above max_bytes must refuse appends: {refused:?}"
        );
    }

    #[test]
    fn retention_keeps_delivered_records_until_they_are_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.retention = Duration::from_secs(3600);
        cfg.dedup_window = Duration::from_secs(60);
        let mut wal = Wal::open(cfg).unwrap();
        wal.append(vec![test_record("x")]).unwrap();
        wal.ack("a", &[(1, 1)]).unwrap();
        assert_eq!(
            wal.compact(now_ms() + 120_000, 100).unwrap(),
            (0, 0),
            "inside retention"
        );
        assert_eq!(
            wal.compact(now_ms() + 3_700_000, 100).unwrap(),
            (1, 0),
            "past retention"
        );
    }

    #[test]
    fn records_past_retention_go_in_batches_a_minute_apart_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.retention = Duration::from_secs(24 * 3600);
        cfg.dedup_window = Duration::from_secs(60);
        let mut wal = Wal::open(cfg).unwrap();
        let t0 = now_ms();
        // A dead letter ahead of them, received long before: it stays, and
        // does not make every pass compact what just aged.
        let mut dead = test_record("dead");
        dead.receive_ms = t0 - 3_600_000;
        let mut old = test_record("old");
        old.receive_ms = t0 - 30_000;
        let mut new = test_record("new");
        new.receive_ms = t0 + 40_000;
        wal.append(vec![dead, old, new]).unwrap();
        wal.dead("a", &[(1, 1)], "refused", 3).unwrap();
        wal.ack("a", &[(2, 3)]).unwrap();
        let day = 24 * 3600 * 1000;
        assert_eq!(
            wal.compact(t0 + day + 29_000, 100).unwrap(),
            (0, 0),
            "the oldest is 59 s past retention: its batch is not due"
        );
        assert_eq!(
            wal.compact(t0 + day + 31_000, 100).unwrap(),
            (1, 0),
            "61 s past: it goes, the one still in retention stays"
        );
        assert_eq!(wal.compact(t0 + day + 99_000, 100).unwrap(), (0, 0));
        assert_eq!(wal.compact(t0 + day + 101_000, 100).unwrap(), (1, 0));
    }

    #[test]
    fn drop_oldest_deletes_the_oldest_records_and_moves_every_cursor_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a", "b"]);
        cfg.policy = BackpressurePolicy::DropOldest;
        cfg.max_bytes = 1; // always over the limit
        let mut wal = Wal::open(cfg).unwrap();
        assert!(
            wal.backpressure().is_none(),
            "drop_oldest never refuses appends for size"
        );
        wal.append((0..10).map(|i| test_record(&format!("k{i}"))).collect())
            .unwrap();
        wal.refresh_space().unwrap();
        let b = wal.fetch("a", 2, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b.ranges, vec![(1, 2)]);
        let (_, dropped) = wal.compact(now_ms(), 4).unwrap();
        assert_eq!(dropped, 4);
        let stats = wal.stats().unwrap();
        for sink in ["a", "b"] {
            assert_eq!(stats.sinks[sink].cursor, 4, "sink {sink}");
            assert_eq!(
                stats.sinks[sink].enqueued + stats.sinks[sink].inflight,
                6,
                "sink {sink}"
            );
        }
        let next = wal.fetch("a", 100, Duration::ZERO).unwrap().unwrap();
        assert_eq!(next.first_seq(), 5);
        wal.ack("a", &b.ranges).unwrap(); // a late ack of dropped records is harmless
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 4);
    }
}
