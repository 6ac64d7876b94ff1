//! Operator actions on the WAL: dead letters (requeue, purge), replay of
//! retained records to one sink, the consistency check and on-demand
//! compaction. Which dead letters an action takes ([`DlqFilter`]) and
//! reading them (list, count, export) live in `dlq.rs`.
//!
//! Requeue and replay make finished records Enqueued again for one sink. The
//! per-sink state stays "cursor + done ranges": the cursor moves down to the
//! lowest reopened seq and everything between it and the old cursor that
//! stays finished becomes a done range. A sink that then delivers in order
//! merges the ranges back into its cursor. Reopened records are never
//! compacted (compaction stops at the lowest cursor).

use std::collections::BTreeMap;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::dlq::DlqFilter;
use super::engine::Wal;
use super::error::WalError;
use super::ranges::RangeSet;
use super::sink_state::{load_sink, persist_sink, SinkState};

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayOutcome {
    /// The sink.
    pub sink: String,
    /// Retained records received in the time range (dead letters of the
    /// sink excluded: requeue those).
    pub matched: u64,
    /// Of those, records the sink had finished and will now receive again.
    pub replayed: u64,
    /// Of those, records still pending for the sink (delivered anyway).
    pub already_pending: u64,
}

/// One finding of [`Wal::check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Machine-readable kind, e.g. `integrity`, `orphaned_dead_letter`.
    pub kind: String,
    /// What is wrong and what it means for delivery.
    pub detail: String,
    /// The check can repair it (`repair = true`).
    pub repairable: bool,
    /// It was repaired by this run.
    pub repaired: bool,
}

/// The result of a consistency check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// No problem found (or every problem found was repaired).
    pub ok: bool,
    /// Records stored.
    pub records: u64,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// The findings.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    fn add(&mut self, kind: &str, detail: String, repairable: bool, repaired: bool) {
        self.problems.push(Problem {
            kind: kind.into(),
            detail,
            repairable,
            repaired,
        });
    }
}

/// SQLite's own integrity check of the database at `path`, for a WAL that
/// [`Wal::open`] refuses or that a check could not read (a damaged file):
/// the report says what SQLite found instead of only "malformed".
pub fn integrity_report(path: &std::path::Path, open_error: &WalError) -> CheckReport {
    let mut rep = CheckReport::default();
    let found: Result<Vec<String>, rusqlite::Error> = (|| {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut stmt = conn.prepare("PRAGMA integrity_check(20)")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    })();
    let detail = match found {
        Ok(lines) => lines.join("; "),
        Err(e) => format!("SQLite cannot read the file: {e}"),
    };
    rep.add(
        "integrity",
        format!(
            "the WAL cannot be read ({open_error}); SQLite integrity check: {detail}. \
             Restore from a copy or export what is readable with `gateway dlq export`"
        ),
        false,
        false,
    );
    rep
}

/// Whether SQLite failed because the file is damaged (not, say, because
/// the disk is full).
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

impl SinkState {
    /// Makes the finished records in `set` Enqueued again (see the module doc).
    fn reopen(&mut self, set: &RangeSet) {
        let Some(&(lo, _)) = set.ranges().first() else {
            return;
        };
        if lo <= self.cursor {
            self.done.insert(lo, self.cursor);
            self.cursor = lo - 1;
        }
        self.done = self.done.difference(set);
        while let Some(end) = self.done.pop_contiguous(self.cursor + 1) {
            self.cursor = self.cursor.max(end);
        }
        // The operator named this sink: it gets them whatever its route says.
        self.forced = self.forced.union(set);
        self.forced.remove_upto(self.cursor);
        self.forced_dirty = true;
        self.hint = [0; 3];
    }

    /// The seqs in `1..=head` this sink has not finished.
    fn unfinished(&self, head: u64) -> RangeSet {
        if head <= self.cursor {
            return RangeSet::new();
        }
        let mut all = RangeSet::new();
        all.insert(self.cursor + 1, head);
        all.difference(&self.done)
    }
}

impl Wal {
    /// The engine's connection, for read-only queries by tools.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Seqs of the dead letters matching `f`, by sink (configured sinks only).
    fn matching_dead(&self, f: &DlqFilter) -> Result<BTreeMap<String, Vec<u64>>, WalError> {
        if let Some(s) = &f.sink {
            if !self.sinks.contains_key(s) {
                return Err(WalError::UnknownSink(s.clone()));
            }
        }
        let (cond, args) = f.condition();
        let sql = format!(
            "SELECT d.sink, d.seq FROM dead d JOIN records r ON r.seq = d.seq WHERE {cond} ORDER BY d.sink, d.seq{}",
            f.limit_sql()
        );
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
        })?;
        for row in rows {
            let (sink, seq) = row?;
            if self.sinks.contains_key(&sink) {
                out.entry(sink).or_default().push(seq);
            }
        }
        Ok(out)
    }

    /// Deletes the dead rows of `seqs` for `sink`; returns how many went.
    fn delete_dead(conn: &Connection, sink: &str, seqs: &RangeSet) -> Result<u64, WalError> {
        let mut del =
            conn.prepare_cached("DELETE FROM dead WHERE sink = ?1 AND seq BETWEEN ?2 AND ?3")?;
        let mut n = 0;
        for &(a, b) in seqs.ranges() {
            n += del.execute(params![sink, a, b])? as u64;
        }
        Ok(n)
    }

    /// Puts the dead letters matching `f` back in their sink's queue: they
    /// are delivered again and leave the dead-letter table. Returns how many.
    pub fn requeue(&mut self, f: &DlqFilter) -> Result<u64, WalError> {
        let matched = self.matching_dead(f)?;
        let tx = self.conn.transaction()?;
        let mut updated = Vec::new();
        let mut total = 0;
        for (sink, seqs) in matched {
            let set = RangeSet::from_sorted(seqs);
            let n = Self::delete_dead(&tx, &sink, &set)?;
            let mut st = self.sinks[&sink].clone();
            st.reopen(&set);
            st.dead_count = st.dead_count.saturating_sub(n);
            persist_sink(&tx, &sink, &st)?;
            total += n;
            updated.push((sink, st));
        }
        tx.commit()?;
        for (sink, mut st) in updated {
            st.mark_persisted();
            self.sinks.insert(sink, st);
        }
        Ok(total)
    }

    /// Deletes the dead letters matching `f` for good (the records stay
    /// finished for their sink). Returns how many.
    pub fn purge(&mut self, f: &DlqFilter) -> Result<u64, WalError> {
        let matched = self.matching_dead(f)?;
        let tx = self.conn.transaction()?;
        let mut counts = Vec::new();
        let mut total = 0;
        for (sink, seqs) in matched {
            let n = Self::delete_dead(&tx, &sink, &RangeSet::from_sorted(seqs))?;
            total += n;
            counts.push((sink, n));
        }
        tx.commit()?;
        for (sink, n) in counts {
            if let Some(st) = self.sinks.get_mut(&sink) {
                st.dead_count = st.dead_count.saturating_sub(n);
            }
        }
        Ok(total)
    }

    /// Delivers the retained records received in `[since_ms, until_ms)` to
    /// `sink` again (only to that sink). The sink's own dead letters are
    /// left to `requeue`.
    pub fn replay(
        &mut self,
        sink: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<ReplayOutcome, WalError> {
        if since_ms >= until_ms {
            return Err(WalError::Invalid(format!(
                "empty time range: since {since_ms} is not before until {until_ms}"
            )));
        }
        let head = self.head();
        let st = self
            .sinks
            .get(sink)
            .ok_or_else(|| WalError::UnknownSink(sink.to_string()))?;
        let seqs: Vec<u64> = {
            let mut stmt = self.conn.prepare(
                "SELECT r.seq FROM records r WHERE r.receive_ms >= ?1 AND r.receive_ms < ?2 \
                 AND NOT EXISTS (SELECT 1 FROM dead d WHERE d.sink = ?3 AND d.seq = r.seq) ORDER BY r.seq",
            )?;
            let rows = stmt.query_map(params![since_ms, until_ms, sink], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let matched = RangeSet::from_sorted(seqs);
        let finished = matched.difference(&st.unfinished(head));
        let mut st = st.clone();
        st.reopen(&finished);
        let tx = self.conn.transaction()?;
        persist_sink(&tx, sink, &st)?;
        tx.commit()?;
        st.mark_persisted();
        self.sinks.insert(sink.to_string(), st);
        let (m, r) = (matched.len(), finished.len());
        Ok(ReplayOutcome {
            sink: sink.to_string(),
            matched: m,
            replayed: r,
            already_pending: m - r,
        })
    }

    /// Compacts everything that is past retention and finished by every
    /// sink now, and truncates SQLite's `-wal` file. Returns (compacted, dropped).
    pub fn compact_now(&mut self) -> Result<(u64, u64), WalError> {
        let (mut compacted, mut dropped) = (0, 0);
        loop {
            let (c, d) = self.compact_with(super::engine::now_ms(), 50_000, false)?;
            compacted += c;
            dropped += d;
            if c + d == 0 {
                break;
            }
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        self.refresh_space()?;
        Ok((compacted, dropped))
    }

    /// Checks the WAL: SQLite's own integrity, the schema, every sink's
    /// stored state against the records, and the dead letters. With
    /// `repair`, fixes what can be fixed without losing or re-ordering
    /// anything acknowledged.
    ///
    /// A file so damaged that reading it fails part-way (SQLite says
    /// "malformed") is reported as an `integrity` problem, like one that
    /// cannot be opened, not as an error of the check.
    pub fn check(&mut self, repair: bool) -> Result<CheckReport, WalError> {
        match self.check_readable(repair) {
            Err(WalError::Storage(e)) if is_damage(&e) => {
                Ok(integrity_report(&self.cfg.path, &WalError::Storage(e)))
            }
            other => other,
        }
    }

    fn check_readable(&mut self, repair: bool) -> Result<CheckReport, WalError> {
        let mut rep = CheckReport::default();
        // Whatever memory holds that the disk does not yet, store first.
        self.flush_acks()?;

        let integrity: Vec<String> = {
            let mut stmt = self.conn.prepare("PRAGMA integrity_check(20)")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if integrity != ["ok"] {
            rep.add(
                "integrity",
                format!(
                    "SQLite integrity check failed (the file is damaged; restore from a copy or \
                     export what is readable with `gateway dlq export`): {}",
                    integrity.join("; ")
                ),
                false,
                false,
            );
        }
        let version: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if version != Some(super::engine::SCHEMA_VERSION) {
            rep.add(
                "schema_version",
                format!(
                    "schema version is {version:?}, this gateway writes {}",
                    super::engine::SCHEMA_VERSION
                ),
                false,
                false,
            );
        }

        rep.records = self
            .conn
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))?;
        rep.dead_letters = self
            .conn
            .query_row("SELECT COUNT(*) FROM dead", [], |r| r.get(0))?;
        let max_seq: u64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
                    r.get(0)
                })?;
        let floor: u64 = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'seq_floor'", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        let top = max_seq.max(floor);

        // Records whose stored body is not a JSON object.
        let bad: Vec<u64> = {
            let mut stmt = self.conn.prepare(
                "SELECT seq FROM records WHERE json_valid(body) = 0 OR substr(body, 1, 1) <> '{' ORDER BY seq LIMIT 20",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if !bad.is_empty() {
            let n: u64 = self.conn.query_row(
                "SELECT COUNT(*) FROM records WHERE json_valid(body) = 0 OR substr(body, 1, 1) <> '{'",
                [],
                |r| r.get(0),
            )?;
            rep.add(
                "bad_record",
                format!(
                    "{n} record(s) hold a body that is not a JSON object (first seqs {bad:?}); \
                     sinks will receive them as stored. Inspect them, then dead-letter or purge by hand"
                ),
                false,
                false,
            );
        }

        // Stored sink state.
        let stored: Vec<(String, u64)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT name, cursor FROM sinks ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut fix_floor = None;
        for (name, cursor) in &stored {
            if !self.sinks.contains_key(name) {
                rep.add(
                    "orphaned_sink",
                    format!(
                        "sink {name:?} has stored state (cursor {cursor}) but is not configured; \
                         its dead letters stay listable. Left alone: the sink may be configured again"
                    ),
                    false,
                    false,
                );
            }
            if *cursor > top {
                rep.add(
                    "cursor_ahead",
                    format!(
                        "sink {name:?} cursor {cursor} is above the highest seq {top}: new records \
                         up to it would count as delivered. Repair raises the seq floor above it"
                    ),
                    true,
                    repair,
                );
                fix_floor = Some(fix_floor.unwrap_or(0).max(*cursor));
            }
        }
        let bad_ranges: Vec<(String, u64, u64)> = {
            let mut stmt = self.conn.prepare(
                "SELECT d.sink, d.first, d.last FROM sink_done d JOIN sinks s ON s.name = d.sink \
                 WHERE d.first > d.last OR d.first <= s.cursor OR d.last > ?1 \
                 OR EXISTS (SELECT 1 FROM sink_done o WHERE o.sink = d.sink AND o.first < d.first AND o.last >= d.first)",
            )?;
            let rows = stmt.query_map([top.max(fix_floor.unwrap_or(0))], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (sink, a, b) in &bad_ranges {
            rep.add(
                "done_range_invalid",
                format!(
                    "sink {sink:?} has a finished range {a}..={b} that is inverted, at or below its \
                     cursor, beyond the last seq or overlapping another. Repair rewrites the ranges normalised"
                ),
                true,
                repair,
            );
        }

        let orphan_dead: Vec<(String, u64)> = {
            let mut stmt = self.conn.prepare(
                "SELECT sink, seq FROM dead d WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.seq = d.seq) ORDER BY seq",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        if !orphan_dead.is_empty() {
            rep.add(
                "orphaned_dead_letter",
                format!(
                    "{} dead letter(s) point at records that no longer exist (first: {:?}); they can \
                     never be requeued. Repair deletes them",
                    orphan_dead.len(),
                    &orphan_dead[..orphan_dead.len().min(5)]
                ),
                true,
                repair,
            );
        }

        // Dead letters that their sink has not finished: they would be
        // delivered again while still listed as dead.
        let mut unfinished_dead: Vec<(String, u64)> = Vec::new();
        for (name, st) in &self.sinks {
            let open = st.unfinished(top);
            if open.is_empty() {
                continue;
            }
            let mut stmt = self
                .conn
                .prepare_cached("SELECT seq FROM dead WHERE sink = ?1 AND seq > ?2 ORDER BY seq")?;
            let rows = stmt.query_map(params![name, st.cursor], |r| r.get::<_, u64>(0))?;
            for seq in rows {
                let seq = seq?;
                if open.contains(seq) && !st.inflight.contains(seq) {
                    unfinished_dead.push((name.clone(), seq));
                }
            }
        }
        if !unfinished_dead.is_empty() {
            rep.add(
                "dead_not_finished",
                format!(
                    "{} dead letter(s) are still queued for their sink (first: {:?}). Repair marks \
                     them finished, so they stay dead letters until requeued",
                    unfinished_dead.len(),
                    &unfinished_dead[..unfinished_dead.len().min(5)]
                ),
                true,
                repair,
            );
        }

        if repair && rep.problems.iter().any(|p| p.repairable) {
            let tx = self.conn.transaction()?;
            if let Some(f) = fix_floor {
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES('seq_floor', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, ?1)",
                    [f],
                )?;
            }
            for (sink, seq) in &orphan_dead {
                tx.execute(
                    "DELETE FROM dead WHERE sink = ?1 AND seq = ?2",
                    params![sink, seq],
                )?;
            }
            let head = top.max(fix_floor.unwrap_or(0));
            let mut reloaded = BTreeMap::new();
            for (name, old) in &self.sinks {
                // Re-read (normalises the ranges), then mark unfinished dead letters finished.
                let mut st = load_sink(&tx, name, head)?;
                st.done.remove(head.saturating_add(1), u64::MAX);
                for (s, seq) in &unfinished_dead {
                    if s == name && *seq > st.cursor {
                        st.done.insert(*seq, *seq);
                    }
                }
                while let Some(end) = st.done.pop_contiguous(st.cursor + 1) {
                    st.cursor = st.cursor.max(end);
                }
                st.inflight = old.inflight.difference(&st.done);
                st.bit = old.bit;
                st.policy = old.policy.clone();
                st.forced = old.forced.clone();
                st.ttl_mark = old.ttl_mark;
                persist_sink(&tx, name, &st)?;
                reloaded.insert(name.clone(), st);
            }
            tx.commit()?;
            reloaded.values_mut().for_each(|s| s.mark_persisted());
            self.sinks = reloaded;
            self.next_seq = self.next_seq.max(head + 1);
        }
        rep.ok = rep.problems.iter().all(|p| p.repaired);
        Ok(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{count_dead, list_dead, now_ms, NewRecord, WalConfig};
    use std::time::Duration;

    fn rec(i: u64, device: &str, ms: i64) -> NewRecord {
        NewRecord {
            idempotency_key: format!("k{i}"),
            correlation_id: format!("c{i}"),
            device_id: device.into(),
            receive_ms: ms,
            body: format!("{{\"idempotency_key\":\"k{i}\",\"n\":{i}}}"),
            route: Default::default(),
        }
    }

    fn drain(wal: &mut Wal, sink: &str) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Some(b) = wal.fetch(sink, 1000, Duration::ZERO).unwrap() {
            seqs.extend(b.records.iter().map(|r| r.seq));
            wal.ack(sink, &b.ranges).unwrap();
        }
        seqs
    }

    fn open(dir: &std::path::Path) -> Wal {
        Wal::open(WalConfig::new(dir.join("w.db"), &["a", "b"])).unwrap()
    }

    #[test]
    fn requeued_dead_letters_are_delivered_again_to_their_sink_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        let now = now_ms();
        wal.append(
            (1..=10)
                .map(|i| rec(i, if i % 2 == 0 { "even" } else { "odd" }, now))
                .collect(),
        )
        .unwrap();
        assert_eq!(drain(&mut wal, "b").len(), 10);
        // Sink a: 1..=3 delivered, 4..=8 dead, 9..=10 delivered.
        wal.ack("a", &[(1, 3), (9, 10)]).unwrap();
        wal.dead("a", &[(4, 8)], "HTTP 400", 3).unwrap();
        assert_eq!(wal.stats().unwrap().sinks["a"].dead, 5);
        assert!(wal.fetch("a", 100, Duration::ZERO).unwrap().is_none());

        let listed = list_dead(wal.connection(), &DlqFilter::default()).unwrap();
        assert_eq!(
            listed.iter().map(|d| d.seq).collect::<Vec<_>>(),
            [4, 5, 6, 7, 8]
        );
        assert_eq!(listed[0].error, "HTTP 400");
        let rec4: serde_json::Value = serde_json::from_str(listed[0].record.get()).unwrap();
        assert_eq!(rec4["seq"], 4);
        assert_eq!(rec4["n"], 4);

        // Only the even device's dead letters.
        let f = DlqFilter {
            sink: Some("a".into()),
            device: Some("even".into()),
            ..Default::default()
        };
        assert_eq!(count_dead(wal.connection(), &f).unwrap(), 3);
        assert_eq!(wal.requeue(&f).unwrap(), 3);
        assert_eq!(drain(&mut wal, "a"), [4, 6, 8]);
        assert!(
            drain(&mut wal, "b").is_empty(),
            "the other sink gets nothing"
        );
        assert_eq!(wal.stats().unwrap().sinks["a"].dead, 2);
        // 5 and 7 are still dead letters, which are finished: the cursor is past all.
        assert_eq!(wal.stats().unwrap().sinks["a"].cursor, 10);

        // The state survives a reopen: 5 and 7 are still dead, nothing pending.
        drop(wal);
        let mut wal = open(dir.path());
        assert!(drain(&mut wal, "a").is_empty());
        assert_eq!(wal.purge(&DlqFilter::default()).unwrap(), 2);
        assert_eq!(wal.stats().unwrap().sinks["a"].dead, 0);
        assert!(drain(&mut wal, "a").is_empty());
        assert!(wal.check(false).unwrap().ok);
    }

    #[test]
    fn replay_redelivers_a_time_range_to_one_sink() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        let t = now_ms() - 60_000;
        wal.append((1..=30).map(|i| rec(i, "d", t + i as i64 * 1000)).collect())
            .unwrap();
        drain(&mut wal, "a");
        drain(&mut wal, "b");
        wal.dead("a", &[], "", 1).unwrap();
        let out = wal.replay("a", t + 10_000, t + 20_000).unwrap();
        assert_eq!(
            (out.matched, out.replayed, out.already_pending),
            (10, 10, 0)
        );
        assert_eq!(drain(&mut wal, "a"), (10..20).collect::<Vec<_>>());
        assert!(drain(&mut wal, "b").is_empty());
        assert!(matches!(wal.replay("a", 5, 5), Err(WalError::Invalid(_))));
        assert!(matches!(
            wal.replay("zz", 0, 5),
            Err(WalError::UnknownSink(_))
        ));
        assert!(wal.check(false).unwrap().ok);
    }

    #[test]
    fn check_finds_and_repairs_damaged_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        wal.append((1..=5).map(|i| rec(i, "d", now_ms())).collect())
            .unwrap();
        drain(&mut wal, "a");
        let report = wal.check(false).unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records, 5);
        {
            let c = wal.connection();
            c.execute("UPDATE sinks SET cursor = 99 WHERE name = 'a'", [])
                .unwrap();
            c.execute("INSERT INTO dead VALUES('a', 77, 1, 'x', 0)", [])
                .unwrap();
            c.execute("INSERT INTO dead VALUES('b', 2, 1, 'x', 0)", [])
                .unwrap();
            c.execute("INSERT INTO sink_done VALUES('b', 4, 3)", [])
                .unwrap();
            c.execute("UPDATE records SET body = 'garbage' WHERE seq = 3", [])
                .unwrap();
        }
        let report = wal.check(false).unwrap();
        assert!(!report.ok);
        let kinds: Vec<&str> = report.problems.iter().map(|p| p.kind.as_str()).collect();
        for k in [
            "cursor_ahead",
            "orphaned_dead_letter",
            "dead_not_finished",
            "done_range_invalid",
            "bad_record",
        ] {
            assert!(kinds.contains(&k), "{k} missing in {kinds:?}");
        }
        let repaired = wal.check(true).unwrap();
        assert!(repaired
            .problems
            .iter()
            .filter(|p| p.repairable)
            .all(|p| p.repaired));
        let after = wal.check(false).unwrap();
        let kinds: Vec<&str> = after.problems.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(kinds, ["bad_record"], "{after:?}");
        // Seqs continue above the cursor that was ahead: nothing new is hidden.
        let o = wal.append(vec![rec(100, "d", now_ms())]).unwrap();
        assert!(matches!(o[0], crate::wal::AppendOutcome::Appended { seq } if seq > 99));
        // Sink b: 1, 3, 4, 5 and the new record; 2 stays a dead letter.
        let b = drain(&mut wal, "b");
        assert_eq!(&b[..4], [1, 3, 4, 5]);
        assert_eq!(b.len(), 5);
    }
}
