//! What the WAL counts: [`Wal::stats`] per sink and for the whole WAL
//! (cheap, run on the writer thread for `GET /admin/wal` and the
//! metrics), and the backlog per sink and class ([`class_stats_on`]: a scan
//! of the backlog, so it runs on a read-only connection of its own thread
//! from a snapshot the writer takes, [`ClassStatsQuery`]). Delivery itself
//! is `delivery.rs`.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::engine::{SinkStats, Wal, WalStats};
use super::error::WalError;
use crate::route::Class;

impl Wal {
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
            let (enqueued, inflight) = (self.enqueued_count(st), st.inflight.len());
            sinks.insert(
                name.clone(),
                SinkStats {
                    cursor: st.cursor,
                    enqueued,
                    inflight,
                    dead: st.dead_count,
                    oldest_pending_ms: oldest,
                    pending_bytes: WalStats::estimate_bytes(
                        self.live_bytes,
                        self.stored_records,
                        enqueued + inflight,
                    ),
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

/// What [`class_stats_on`] needs of the writer's in-memory state, copied on
/// the writer thread (cheap), so that the scan itself can run on a read-only
/// connection of another thread.
#[derive(Debug, Clone)]
pub struct ClassStatsQuery {
    head: u64,
    sinks: Vec<SinkScan>,
}

/// One sink's part of a [`ClassStatsQuery`]: name, cursor, bit, the first
/// 256 finished ranges above the cursor, and the per-class scan hints.
type SinkScan = (String, u64, u32, Vec<(u64, u64)>, [u64; 3]);

impl Wal {
    /// The inputs of [`class_stats_on`] as they are now.
    pub fn class_stats_query(&self) -> ClassStatsQuery {
        ClassStatsQuery {
            head: self.head(),
            sinks: self
                .sinks
                .iter()
                .map(|(name, st)| {
                    let done = st.done.ranges().iter().take(256).copied().collect();
                    (name.clone(), st.cursor, st.bit, done, st.hint)
                })
                .collect(),
        }
    }

    /// [`class_stats_on`] on the writer's own connection (tests compare the
    /// two connections).
    #[cfg(test)]
    pub fn class_stats(&self) -> Result<BTreeMap<String, ClassStats>, WalError> {
        class_stats_on(&self.conn, &self.class_stats_query())
    }
}

/// Per sink and class: the records the sink has not finished (Enqueued or
/// InFlight) and the receive time of the oldest. Counts subtract the first
/// 256 finished ranges above the cursor (more only after a long priority
/// drain, when the count is briefly high); the oldest is the first such
/// record above the class's scan hint.
///
/// Costs a scan of the backlog: 2.5 s per sink for a backlog of 1.1M
/// records in a 1.7 GB WAL. So the gateway runs it on a read-only
/// connection of its own thread, never on the writer's: there it starved
/// appends (measured in the chaos soak: HTTP ingest fell to a few requests a
/// second and MQTT keep-alives lapsed).
pub fn class_stats_on(
    conn: &Connection,
    q: &ClassStatsQuery,
) -> Result<BTreeMap<String, ClassStats>, WalError> {
    let mut out = BTreeMap::new();
    let routed = "(sinks IS NULL OR (sinks & ?2) <> 0)";
    let mut count = conn.prepare_cached(&format!(
        "SELECT class, COUNT(*) FROM records WHERE seq > ?1 AND {routed} GROUP BY class"
    ))?;
    let mut count_in = conn.prepare_cached(&format!(
        "SELECT class, COUNT(*) FROM records WHERE seq >= ?1 AND seq <= ?3 AND {routed} GROUP BY class"
    ))?;
    let mut first_normal = conn.prepare_cached(&format!(
        "SELECT receive_ms FROM records WHERE seq > ?1 AND {routed} AND class = 1 ORDER BY seq LIMIT 1"
    ))?;
    let mut first_other = conn.prepare_cached(&format!(
        "SELECT receive_ms FROM records WHERE class <> 1 AND class = ?3 AND seq > ?1 AND {routed} ORDER BY seq LIMIT 1"
    ))?;
    for (name, cursor, bit, done, hint) in &q.sinks {
        let mut per = [(0u64, None); 3];
        if q.head > *cursor {
            let bit = (1u64 << bit) as i64;
            let mut rows = count.query(params![cursor, bit])?;
            while let Some(r) = rows.next()? {
                per[Class::from_code(r.get(0)?) as usize].0 += r.get::<_, u64>(1)?;
            }
            for &(a, b) in done {
                let mut rows = count_in.query(params![a, bit, b])?;
                while let Some(r) = rows.next()? {
                    let slot = &mut per[Class::from_code(r.get(0)?) as usize].0;
                    *slot = slot.saturating_sub(r.get::<_, u64>(1)?);
                }
            }
            for class in Class::ALL {
                let c = class as usize;
                if per[c].0 == 0 {
                    continue;
                }
                let from = (*cursor).max(hint[c]);
                per[c].1 = if class == Class::Normal {
                    first_normal.query_row(params![from, bit], |r| r.get(0))
                } else {
                    first_other.query_row(params![from, bit, class.code()], |r| r.get(0))
                }
                .optional()?;
            }
        }
        out.insert(name.clone(), per);
    }
    Ok(out)
}

/// Per class (index: `Class as usize`): records not finished, and the
/// receive time (epoch ms) of the oldest.
pub type ClassStats = [(u64, Option<i64>); 3];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::engine::test_record;
    use crate::wal::WalConfig;
    use std::time::Duration;

    #[test]
    fn the_backlog_per_class_counts_the_same_on_another_connection() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig::new(dir.path().join("wal.db"), &["a", "b"]);
        let mut wal = Wal::open(cfg.clone()).unwrap();
        wal.append((0..10).map(|i| test_record(&format!("k{i}"))).collect())
            .unwrap();
        let b = wal.fetch("a", 4, Duration::ZERO).unwrap().unwrap();
        wal.ack("a", &b.ranges).unwrap();
        let own = wal.class_stats().unwrap();
        assert_eq!(own["a"][Class::Normal as usize].0, 6);
        assert_eq!(own["b"][Class::Normal as usize].0, 10);
        // What the gateway does: the snapshot on the writer, the scan on a
        // read-only connection of another thread.
        let reader = Connection::open(&cfg.path).unwrap();
        reader.pragma_update(None, "query_only", true).unwrap();
        let query = wal.class_stats_query();
        let other = std::thread::spawn(move || class_stats_on(&reader, &query).unwrap())
            .join()
            .unwrap();
        assert_eq!(other, own);
    }

    /// SQLite VM steps (in thousands) that `f` runs on `wal`'s connection.
    fn vm_steps<T>(wal: &Wal, f: impl FnOnce(&Wal) -> T) -> (T, u64) {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let steps = Arc::new(AtomicU64::new(0));
        let s = steps.clone();
        wal.conn
            .progress_handler(
                1000,
                Some(move || {
                    s.fetch_add(1, Ordering::Relaxed);
                    false
                }),
            )
            .unwrap();
        let out = f(wal);
        wal.conn
            .progress_handler(1000, None::<fn() -> bool>)
            .unwrap();
        (out, steps.load(Ordering::Relaxed))
    }

    /// `GET /admin/wal` and the metrics run `stats()` on the writer thread:
    /// it must not read the backlog. It once summed the body sizes of every
    /// pending record; with 1.3M records backlogged the chaos soak's polling
    /// left the writer 167 records/s for everything else.
    #[test]
    fn stats_cost_the_same_whatever_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(WalConfig::new(dir.path().join("wal.db"), &["a", "b"])).unwrap();
        wal.append((0..100).map(|i| test_record(&format!("s{i}"))).collect())
            .unwrap();
        // Housekeeping refreshes the size every 500 ms; the estimate uses it.
        wal.refresh_space().unwrap();
        let (small, small_steps) = vm_steps(&wal, |w| w.stats().unwrap());
        for chunk in 0..40 {
            wal.append(
                (0..1000)
                    .map(|i| test_record(&format!("b{chunk}-{i}")))
                    .collect(),
            )
            .unwrap();
        }
        wal.refresh_space().unwrap();
        let (big, big_steps) = vm_steps(&wal, |w| w.stats().unwrap());
        assert_eq!(small.sinks["a"].enqueued, 100);
        assert_eq!(big.sinks["a"].enqueued, 40_100);
        assert!(
            big.sinks["a"].pending_bytes > 40 * small.sinks["a"].pending_bytes,
            "the estimate grows with the backlog: {} -> {}",
            small.sinks["a"].pending_bytes,
            big.sinks["a"].pending_bytes
        );
        assert!(
            big_steps <= small_steps + 2,
            "stats() ran {big_steps}k VM steps with 40,100 records pending, {small_steps}k with 100"
        );
    }
}
