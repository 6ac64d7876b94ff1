//! Per-sink TTLs (DESIGN §6a): a record a sink has not delivered within its
//! class's TTL is expired for that sink. It becomes one of the sink's dead
//! letters with the error `expired` (listed, exported and requeued like any
//! other), never dropped silently.
//!
//! Each sink keeps, per class, a mark: every record of that class up to the
//! mark has been judged. Housekeeping judges from the mark on, in seq order,
//! and stops at the first record still inside its TTL (receive times grow
//! with seq). So a pass costs what aged since the last one, and a requeued
//! expired record (below the mark) is delivered, not expired again. A record
//! InFlight when its TTL passes is delivered, not expired.

use rusqlite::params;

use super::engine::{write_meta, Wal, WriteOp};
use super::error::WalError;
use super::ranges::RangeSet;
use super::sink_state::ttl_mark_key;
use crate::route::Class;

/// The dead-letter error of an expired record.
pub const EXPIRED: &str = "expired";
/// Most records judged per sink and class in one pass.
const EXPIRE_CHUNK: usize = 5000;

impl Wal {
    /// Expires what outlived its TTL, at `now_ms`. Returns how many records
    /// expired, per sink and class.
    pub fn expire(&mut self, now_ms: i64) -> Result<Vec<(String, Class, u64)>, WalError> {
        let mut out = Vec::new();
        let names: Vec<String> = self
            .sinks
            .iter()
            .filter(|(_, st)| !st.policy.ttl.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for sink in names {
            let ttls: Vec<(Class, i64)> = self.sinks[&sink]
                .policy
                .ttl
                .iter()
                .map(|(c, d)| (*c, now_ms - d.as_millis() as i64))
                .collect();
            for (class, cutoff) in ttls {
                let (expired, mark) = self.judge(&sink, class, cutoff)?;
                let st = &self.sinks[&sink];
                if mark <= st.ttl_mark[class as usize] {
                    continue;
                }
                let n = expired.len();
                if n > 0 {
                    self.write(&[WriteOp::Dead {
                        sink: sink.clone(),
                        ranges: expired.ranges().to_vec(),
                        error: EXPIRED.to_string(),
                        attempts: 0,
                    }])?
                    .pop()
                    .unwrap_or(Ok(super::engine::WriteResult::Done))?;
                    out.push((sink.clone(), class, n));
                }
                write_meta(&self.conn, &ttl_mark_key(&sink, class), mark)?;
                self.sink_mut(&sink)?.ttl_mark[class as usize] = mark;
            }
        }
        Ok(out)
    }

    /// The Enqueued records of `class` for `sink` received before `cutoff`,
    /// from the mark on, and the new mark.
    fn judge(&self, sink: &str, class: Class, cutoff: i64) -> Result<(RangeSet, u64), WalError> {
        let st = &self.sinks[sink];
        let bit = 1u64 << st.bit;
        let from = st.ttl_mark[class as usize].max(st.cursor);
        let excluded = st.excluded();
        let mut q = self.conn.prepare_cached(
            "SELECT seq, class, sinks, receive_ms FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = q.query(params![from, EXPIRE_CHUNK as i64])?;
        let mut expired = RangeSet::new();
        let mut mark = from;
        while let Some(r) = rows.next()? {
            let seq: u64 = r.get(0)?;
            let ms: i64 = r.get(3)?;
            if ms >= cutoff {
                break;
            }
            mark = seq;
            if Class::from_code(r.get(1)?) != class || excluded.contains(seq) {
                continue;
            }
            let sinks: Option<i64> = r.get(2)?;
            if sinks.is_none_or(|s| s as u64 & bit != 0) || st.forced.contains(seq) {
                expired.insert(seq, seq);
            }
        }
        Ok((expired, mark))
    }
}
