//! The dedup index's upkeep: merging the keys held in memory into the `idem`
//! table, and sweeping out the rows of records that are gone.
//!
//! Both write `idem` in key order, a run of neighbouring leaf pages at a
//! time. Written per record, the index would cost a page or two per key
//! once it holds hours of keys: a random key lands on a random leaf, and
//! every leaf a commit touches is written whole. The engine with a day of
//! the seed's site in the WAL (3.46M keys) wrote 12.4 KB a record with
//! merges of 8,192 keys and a delete per compacted record, 7.1 KB with
//! merges of 57,344 and the sweep (5.7 KB on an empty WAL;
//! `examples/wal_steady.rs`, bench/results/cost-2026-12-08-stop42.md).

use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::engine::{write_meta, Wal};
use super::error::WalError;

/// Dedup keys held in memory before a group commit merges them into the
/// `idem` table: as many as a table of 65,536 buckets holds (16 bytes a key,
/// ~1.1 MB). The larger a merge, the fewer of the table's leaves it writes
/// per key.
pub(super) const MERGE_KEYS_AT: usize = 57_344;
/// An idle writer merges the keys it holds after this long without appends.
pub(super) const MERGE_KEYS_IDLE: Duration = Duration::from_secs(2);
/// Rows of `idem` one sweep step passes over (one a housekeeping pass).
const SWEEP_SLICE: i64 = 4096;
/// The `meta` key counting the records deleted since the last sweep of
/// `idem` started, whose rows there may still be; stored in the
/// transaction that deletes them.
pub(super) const IDEM_STALE: &str = "idem_stale";
/// A sweep starts once this many records were deleted since the last one
/// started, and at least half as many as the WAL holds: the table then
/// holds at most ~1.5 rows a record, and a sweep rewrites each of its leaves
/// about once per half a WAL's worth of records deleted.
pub(super) const SWEEP_AT: u64 = 65_536;

/// A sweep of the `idem` table under way (in memory: after a restart the
/// count in `meta` starts it again from the first key).
#[derive(Debug)]
pub(super) struct Sweep {
    /// Every row below this key was swept.
    from: String,
    /// `meta.idem_stale` when the sweep started: what it takes off at the end.
    stale_at_start: u64,
}

impl Sweep {
    /// A sweep from the first key, started when `stale` records were counted.
    fn start(stale: u64) -> Self {
        Self {
            from: String::new(),
            stale_at_start: stale,
        }
    }
}

/// Writes the keys of the records above `above` (each key's latest seq)
/// into `idem` in key order, so each leaf page is written once per merge,
/// and moves the mark to `upto`. The keys are read back from the records:
/// memory holds only their hashes. A record is deleted only after its key
/// was merged ([`Wal::merge_keys_upto`]).
pub(super) fn write_keys(tx: &Transaction, above: u64, upto: u64) -> Result<(), WalError> {
    // One buffer of keys and one of (start, end, seq): two allocations,
    // handed back whole, not one per key.
    let mut text = String::new();
    let mut keys: Vec<(u32, u32, u64)> = Vec::new();
    keys_above(tx, above, |key, seq| {
        let start = text.len() as u32;
        text.push_str(key);
        keys.push((start, text.len() as u32, seq));
    })?;
    let key = |&(a, b, _): &(u32, u32, u64)| &text[a as usize..b as usize];
    // By key, then seq: the last write of a key is its latest record.
    keys.sort_unstable_by(|x, y| key(x).cmp(key(y)).then(x.2.cmp(&y.2)));
    let mut put = tx.prepare_cached("INSERT OR REPLACE INTO idem(key, seq) VALUES(?1, ?2)")?;
    for k in &keys {
        put.execute(params![key(k), k.2])?;
    }
    write_meta(tx, "idem_upto", upto)
}

/// Calls `f(key, seq)` for the idempotency key of each record above `above`,
/// in seq order (the keys not merged into `idem` yet: read back at open and
/// by a merge; a key stored twice ends at its latest record).
pub(super) fn keys_above(
    conn: &Connection,
    above: u64,
    mut f: impl FnMut(&str, u64),
) -> Result<(), WalError> {
    let mut q =
        conn.prepare_cached("SELECT idem_key, seq FROM records WHERE seq > ?1 ORDER BY seq")?;
    let mut rows = q.query([above])?;
    while let Some(row) = rows.next()? {
        let key = row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
        f(key, row.get(1)?);
    }
    Ok(())
}

impl Wal {
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
        write_keys(&tx, self.idem_upto, self.next_seq - 1)?;
        tx.commit()?;
        self.keys_merged();
        // Outside a burst of appends the memory goes back.
        self.recent_keys.shrink_to_fit();
        Ok(())
    }

    /// After `write_keys` committed: every key up to the head is in `idem`.
    pub(super) fn keys_merged(&mut self) {
        self.recent_keys.clear();
        self.idem_upto = self.next_seq - 1;
    }

    /// After a transaction that deleted `n` records (and stored
    /// [`IDEM_STALE`] as `idem_stale + n`) committed.
    pub(super) fn stale_counted(&mut self, n: u64) {
        self.idem_stale += n;
    }

    /// Sweeps the whole dedup index now, however few records were deleted
    /// (tools, benchmarks). Returns the rows it deleted.
    pub fn sweep_keys(&mut self) -> Result<u64, WalError> {
        if self.idem_sweep.is_none() {
            self.idem_sweep = Some(Sweep::start(self.idem_stale));
        }
        let mut deleted = 0;
        while self.idem_sweep.is_some() {
            deleted += self.sweep_keys_step()?;
        }
        Ok(deleted)
    }

    /// One step of the sweep that takes the keys of deleted records out of
    /// `idem` (a record's deletion leaves its row: deleting it there would
    /// write a random leaf per record). Starts a sweep when enough records
    /// were deleted ([`SWEEP_AT`]); each step passes over the next
    /// [`SWEEP_SLICE`] keys in key order and deletes the rows whose record
    /// is gone (a dead letter's record stays, and so does its key). Returns
    /// the rows it deleted.
    pub fn sweep_keys_step(&mut self) -> Result<u64, WalError> {
        if self.idem_sweep.is_none() {
            if self.idem_stale < SWEEP_AT.max(self.stored_records / 2) {
                return Ok(0);
            }
            self.idem_sweep = Some(Sweep::start(self.idem_stale));
        }
        let sweep = self.idem_sweep.as_ref().expect("started above");
        // The first key of the next slice; none: this slice is the last.
        let next: Option<String> = self
            .conn
            .prepare_cached("SELECT key FROM idem WHERE key >= ?1 ORDER BY key LIMIT 1 OFFSET ?2")?
            .query_row(params![sweep.from, SWEEP_SLICE], |r| r.get(0))
            .optional()?;
        let tx = self.conn.transaction()?;
        // Only records at or below the seq floor were ever deleted.
        const GONE: &str = "seq <= (SELECT value FROM meta WHERE key = 'seq_floor') \
             AND NOT EXISTS (SELECT 1 FROM records r WHERE r.seq = idem.seq)";
        let deleted = match &next {
            Some(next) => tx
                .prepare_cached(&format!(
                    "DELETE FROM idem WHERE key >= ?1 AND key < ?2 AND {GONE}"
                ))?
                .execute(params![sweep.from, next])?,
            None => tx
                .prepare_cached(&format!("DELETE FROM idem WHERE key >= ?1 AND {GONE}"))?
                .execute([&sweep.from])?,
        } as u64;
        let stale_left = self.idem_stale.saturating_sub(sweep.stale_at_start);
        if next.is_none() {
            // Records deleted during the sweep count towards the next one.
            write_meta(&tx, IDEM_STALE, stale_left)?;
        }
        tx.commit()?;
        match next {
            Some(next) => self.idem_sweep.as_mut().expect("started above").from = next,
            None => {
                self.idem_sweep = None;
                self.idem_stale = stale_left;
                tracing::debug!("WAL dedup index swept");
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;
    use std::time::Instant;

    use rusqlite::Connection;

    use super::*;
    use crate::wal::engine::{now_ms, test_record};
    use crate::wal::{AppendOutcome, NewRecord, WalConfig};

    use crate::wal::engine::{test_append as outcome, test_wal as open};

    /// A `meta` value of the WAL in `dir` (0 if unset), read as another
    /// connection would.
    fn meta(dir: &tempfile::TempDir, key: &str) -> u64 {
        Connection::open(dir.path().join("wal.db"))
            .unwrap()
            .query_row(
                "SELECT COALESCE((SELECT value FROM meta WHERE key = ?1), 0)",
                [key],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// Whether the WAL in `dir` has a table, index or trigger named `name`.
    fn in_schema(dir: &tempfile::TempDir, name: &str) -> bool {
        Connection::open(dir.path().join("wal.db"))
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = ?1",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            > 0
    }

    /// The rows of `idem` (key, seq) in seq order.
    fn idem_rows(dir: &tempfile::TempDir) -> Vec<(String, u64)> {
        Connection::open(dir.path().join("wal.db"))
            .unwrap()
            .prepare("SELECT key, seq FROM idem ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    /// (rows of `idem`, `meta.idem_upto`).
    fn idem_on_disk(dir: &tempfile::TempDir) -> (u64, u64) {
        (idem_rows(dir).len() as u64, meta(dir, "idem_upto"))
    }

    /// (rows of `idem`, `meta.idem_stale`).
    fn idem_rows_and_stale(dir: &tempfile::TempDir) -> (Vec<(String, u64)>, u64) {
        (idem_rows(dir), meta(dir, IDEM_STALE))
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
            "DROP TRIGGER IF EXISTS records_forget_idem; DROP TABLE idem; DELETE FROM meta WHERE key = 'idem_upto';
             CREATE INDEX records_idem ON records(idem_key);
             UPDATE meta SET value = 2 WHERE key = 'schema_version';",
        )
        .unwrap();
        drop(conn);

        let mut wal = open(&dir);
        assert_eq!(idem_on_disk(&dir), (3, 3));
        assert!(wal.recent_keys.is_empty());
        assert!(!in_schema(&dir, "records_idem"), "the old index is dropped");
        assert!(matches!(
            outcome(&mut wal, "k2"),
            AppendOutcome::Duplicate { seq: 2, .. }
        ));
        assert!(wal.check(false).unwrap().problems.is_empty());
    }

    #[test]
    fn a_key_whose_hash_memory_holds_for_another_key_is_looked_up_in_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(&dir);
        outcome(&mut wal, "k1");
        wal.merge_keys().unwrap();
        outcome(&mut wal, "k2");
        // As if k1 and k2 had one hash: memory holds k2's record for k1's.
        let (h1, h2) = (wal.key_hasher.hash_one("k1"), wal.key_hasher.hash_one("k2"));
        let seq2 = wal.recent_keys.remove(&h2).unwrap();
        wal.recent_keys.insert(h1, seq2);
        assert!(
            matches!(
                outcome(&mut wal, "k1"),
                AppendOutcome::Duplicate { seq: 1, .. }
            ),
            "k1 is in idem"
        );
        assert_eq!(outcome(&mut wal, "k3"), AppendOutcome::Appended { seq: 3 });
    }

    #[test]
    fn a_wal_of_schema_3_loses_the_trigger_that_deleted_a_key_with_its_record() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(&dir));
        Connection::open(dir.path().join("wal.db"))
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER records_forget_idem AFTER DELETE ON records BEGIN
                     DELETE FROM idem WHERE key = old.idem_key AND seq = old.seq;
                 END;",
            )
            .unwrap();
        assert!(in_schema(&dir, "records_forget_idem"));
        drop(open(&dir));
        assert!(!in_schema(&dir, "records_forget_idem"));
    }

    #[test]
    fn a_sweep_takes_out_the_keys_of_deleted_records_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.retention = Duration::ZERO;
        cfg.dedup_window = Duration::from_secs(3600);
        let mut wal = Wal::open(cfg.clone()).unwrap();
        wal.append((1..=8).map(|i| test_record(&format!("k{i}"))).collect())
            .unwrap();
        wal.merge_keys().unwrap();
        // 1..=5 are finished (3 as a dead letter); compacted as if the
        // dedup window (which retention is kept for at least) had passed.
        wal.ack("a", &[(1, 2), (4, 5)]).unwrap();
        wal.dead("a", &[(3, 3)], "refused", 3).unwrap();
        assert_eq!(wal.compact(now_ms() + 3_700_000, 100).unwrap(), (4, 0));
        let (rows, stale) = idem_rows_and_stale(&dir);
        assert_eq!(rows.len(), 8, "compaction leaves the keys to the sweep");
        assert_eq!(stale, 4, "and counts them");
        // A key whose record is gone is no duplicate, swept or not.
        assert_eq!(outcome(&mut wal, "k1"), AppendOutcome::Appended { seq: 9 });

        assert_eq!(wal.sweep_keys_step().unwrap(), 0, "too few to sweep yet");
        // Reopened, the count is the stored one.
        drop(wal);
        let mut wal = Wal::open(cfg).unwrap();
        assert_eq!(wal.idem_stale, 4);
        wal.idem_stale = SWEEP_AT;
        let mut swept = 0;
        loop {
            swept += wal.sweep_keys_step().unwrap();
            if wal.idem_sweep.is_none() {
                break;
            }
        }
        assert_eq!(swept, 4, "the rows of k1, k2, k4 and k5");
        wal.merge_keys().unwrap();
        let (rows, stale) = idem_rows_and_stale(&dir);
        let seqs: Vec<u64> = rows.iter().map(|r| r.1).collect();
        assert_eq!(seqs, [3, 6, 7, 8, 9], "the dead letter's key stays");
        assert_eq!(stale, 0, "the sweep took off its count");
        assert_eq!(wal.idem_stale, 0);
        for (key, seq) in [("k3", 3), ("k6", 6), ("k1", 9)] {
            assert!(
                matches!(outcome(&mut wal, key), AppendOutcome::Duplicate { seq: s, .. } if s == seq),
                "{key} is still a duplicate of {seq}"
            );
        }
        assert_eq!(outcome(&mut wal, "k2"), AppendOutcome::Appended { seq: 10 });
    }

    #[test]
    fn a_sweep_passes_over_the_table_a_slice_at_a_time_and_counts_what_was_deleted_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path().join("wal.db"), &["a"]);
        cfg.retention = Duration::ZERO;
        cfg.dedup_window = Duration::ZERO;
        let mut wal = Wal::open(cfg).unwrap();
        let n = 3 * SWEEP_SLICE as u64;
        wal.append((1..=n).map(|i| test_record(&format!("k{i}"))).collect())
            .unwrap();
        wal.merge_keys().unwrap();
        wal.ack("a", &[(1, n / 2)]).unwrap();
        let later = now_ms() + 1000;
        while wal.compact(later, COMPACT).unwrap().0 > 0 {}
        wal.idem_stale = SWEEP_AT;
        let mut steps = 0;
        let mut swept = 0;
        loop {
            swept += wal.sweep_keys_step().unwrap();
            steps += 1;
            if steps == 2 {
                // Deleted while the sweep runs: counted for the next one.
                wal.ack("a", &[(n / 2 + 1, n / 2 + 10)]).unwrap();
                assert_eq!(wal.compact(later, COMPACT).unwrap().0, 10);
            }
            if wal.idem_sweep.is_none() {
                break;
            }
        }
        assert_eq!(steps, 3, "three slices of {SWEEP_SLICE}");
        // The ten deleted during the sweep may or may not be in a slice already passed.
        assert!(
            (n / 2..=n / 2 + 10).contains(&swept),
            "swept {swept} of {} gone",
            n / 2 + 10
        );
        assert_eq!(wal.idem_stale, 10);
        assert_eq!(idem_rows_and_stale(&dir).1, 10);
        assert_eq!(wal.sweep_keys_step().unwrap(), 0, "no new sweep yet");
    }

    const COMPACT: usize = 5000;
}
