//! A sink's delivery state ([`SinkState`]: a cursor plus finished ranges
//! above it, in flight, forced and TTL marks) and how it is stored: loaded
//! at open ([`load_sink`]), written whole or by what changed
//! ([`persist_sink`], [`persist_dirty`]). The engine holds one per sink;
//! [`super::delivery`] moves it (fetch, ack, dead, release).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};

use super::engine::read_meta;
use super::error::WalError;
use super::ranges::RangeSet;
use crate::route::{Class, SinkPolicy};

#[derive(Debug, Default, Clone)]
pub(super) struct SinkState {
    pub(super) cursor: u64,
    pub(super) done: RangeSet,
    pub(super) inflight: RangeSet,
    pub(super) dead_count: u64,
    /// The stored cursor/done rows are behind the in-memory state.
    pub(super) dirty: bool,
    /// Its bit in a record's sink set (`records.sinks`).
    pub(super) bit: u32,
    /// Route, TTLs and drain order (set by the gateway, not stored here).
    pub(super) policy: SinkPolicy,
    /// Records reopened by requeue or replay: delivered to this sink whatever
    /// its route says (stored in `sink_forced`).
    pub(super) forced: RangeSet,
    /// `forced` changed since it was stored.
    pub(super) forced_dirty: bool,
    /// Per class: no record of that class in `(cursor, hint]` is Enqueued for
    /// this sink, so a scan may start above it. Reset to 0 whenever a record
    /// goes back to Enqueued (release, requeue, replay).
    pub(super) hint: [u64; 3],
    /// Per class: the TTL has judged every record up to here
    /// (`meta` key `ttl/SINK/CLASS`).
    pub(super) ttl_mark: [u64; 3],
    /// Reduction state rows changed since the last commit (device → JSON,
    /// `None`: delete), stored with the acks they came with.
    pub(super) reduce: BTreeMap<String, Option<String>>,
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

    /// Takes an ack's reduction state rows (stored with the next commit
    /// that stores the ack).
    pub(super) fn set_reduce_rows(&mut self, rows: &[(String, Option<String>)]) {
        if rows.is_empty() {
            return;
        }
        for (device, state) in rows {
            self.reduce.insert(device.clone(), state.clone());
        }
        self.dirty = true;
    }

    /// The state was committed as it is in memory.
    pub(super) fn mark_persisted(&mut self) {
        self.dirty = false;
        self.reduce.clear();
        self.forced_dirty = false;
        self.stored = Some((self.cursor, self.done.clone()));
    }

    pub(super) fn excluded(&self) -> RangeSet {
        self.done.union(&self.inflight)
    }
}

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
    let mut q = conn.prepare("SELECT first, last FROM sink_forced WHERE sink = ?1")?;
    let rows = q.query_map([name], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))?;
    for row in rows {
        let (a, b) = row?;
        if a <= b {
            st.forced.insert(a, b);
        }
    }
    st.forced.remove_upto(st.cursor);
    st.policy = SinkPolicy::new();
    for class in Class::ALL {
        st.ttl_mark[class as usize] = read_meta(conn, &ttl_mark_key(name, class))?;
    }
    Ok(st)
}

/// The `meta` key of a sink's TTL mark for `class`.
pub(super) fn ttl_mark_key(sink: &str, class: Class) -> String {
    format!("ttl/{sink}/{class}")
}

/// Acknowledgements held in memory since `since` are due to be stored
/// ([`Wal::acks_due`]; a free function for callers that hold a transaction).
pub(super) fn held_acks_due(since: Option<Instant>, ack_flush: Duration) -> bool {
    since.is_some_and(|t| t.elapsed() >= ack_flush)
}

/// Stores every sink whose delivery state in memory is ahead of the stored
/// one. The caller calls [`Wal::sinks_stored`] once the transaction committed.
pub(super) fn persist_dirty(
    conn: &Connection,
    sinks: &BTreeMap<String, SinkState>,
) -> Result<(), WalError> {
    for (name, st) in sinks {
        if st.dirty {
            persist_sink(conn, name, st)?;
        }
    }
    Ok(())
}

/// Stores one sink's cursor and done ranges as they are in memory: only
/// what changed since the last commit when that is known, else everything.
/// The caller calls `mark_persisted` once the transaction committed.
pub(super) fn persist_sink(conn: &Connection, name: &str, st: &SinkState) -> Result<(), WalError> {
    if !st.reduce.is_empty() {
        let mut put = conn.prepare_cached(
            "INSERT OR REPLACE INTO sink_reduce(sink, device, state) VALUES(?1, ?2, ?3)",
        )?;
        let mut del =
            conn.prepare_cached("DELETE FROM sink_reduce WHERE sink = ?1 AND device = ?2")?;
        for (device, state) in &st.reduce {
            match state {
                Some(s) => put.execute(params![name, device, s])?,
                None => del.execute(params![name, device])?,
            };
        }
    }
    if st.forced_dirty {
        conn.execute("DELETE FROM sink_forced WHERE sink = ?1", [name])?;
        let mut ins =
            conn.prepare_cached("INSERT INTO sink_forced(sink, first, last) VALUES(?1, ?2, ?3)")?;
        for &(a, b) in st.forced.ranges() {
            if b > st.cursor {
                ins.execute(params![name, a, b])?;
            }
        }
    }
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

    #[test]
    fn range_changes_lists_what_to_delete_and_insert() {
        let old = [(1, 2), (5, 7), (9, 9)];
        let new = [(1, 2), (5, 8), (12, 13)];
        let (gone, added) = range_changes(&old, &new);
        assert_eq!(gone, [(5, 7), (9, 9)]);
        assert_eq!(added, [(5, 8), (12, 13)]);
        assert_eq!(range_changes(&new, &new), (vec![], vec![]));
    }
}
