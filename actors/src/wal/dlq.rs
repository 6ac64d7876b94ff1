//! Dead letters, read: which ones an action applies to ([`DlqFilter`],
//! from a request's JSON or query string), and listing, counting and
//! streaming them with their records ([`list_dead`], [`count_dead`],
//! [`for_each_dead`]). The readers take any connection, so the admin API
//! and the CLI read through a pool of read-only connections (`WalReader`)
//! without holding up the writer thread. Changing dead letters (requeue,
//! purge) is an operator action in `admin.rs`.

use rusqlite::types::Value as SqlValue;
use rusqlite::{params_from_iter, Connection};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::engine::splice_record;
use super::error::WalError;

/// Which dead letters an action applies to. Every field is optional; all
/// given ones must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqFilter {
    /// Dead letters of this sink only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// Of this device only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Dead-lettered at or after this time (epoch ms; `since` in requests,
    /// which also takes RFC 3339).
    #[serde(
        default,
        alias = "since",
        deserialize_with = "time_ms_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub since_ms: Option<i64>,
    /// Dead-lettered before this time (epoch ms; `until` in requests).
    #[serde(
        default,
        alias = "until",
        deserialize_with = "time_ms_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub until_ms: Option<i64>,
    /// The error text contains this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seq strictly above this (paging; exact when `sink` is set).
    #[serde(
        default,
        deserialize_with = "u64_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub after_seq: Option<u64>,
    /// At most this many.
    #[serde(
        default,
        deserialize_with = "u64_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit: Option<u64>,
}

/// A time as epoch milliseconds from a number, a string of digits, or an
/// RFC 3339 string (`2026-11-25T10:00:00Z`).
pub fn parse_time_ms(v: &serde_json::Value) -> Result<i64, String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not a time in epoch milliseconds")),
        serde_json::Value::String(s) => {
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                return s.parse().map_err(|e| format!("{s:?}: {e}"));
            }
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|e| format!("{s:?} is neither epoch milliseconds nor RFC 3339: {e}"))
        }
        other => Err(format!("{other} is not a time")),
    }
}

/// Serde: a required time (see [`parse_time_ms`]).
pub fn time_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    parse_time_ms(&v).map_err(serde::de::Error::custom)
}

fn time_ms_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => parse_time_ms(&v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Numbers also arrive as strings (URL query parameters).
fn u64_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a count"))),
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a count"))),
        Some(other) => Err(serde::de::Error::custom(format!("{other} is not a count"))),
    }
}

impl DlqFilter {
    /// The SQL condition (over `dead d JOIN records r`) and its parameters.
    pub(super) fn condition(&self) -> (String, Vec<SqlValue>) {
        let mut sql = String::from("1 = 1");
        let mut args = Vec::new();
        if let Some(s) = &self.sink {
            sql.push_str(" AND d.sink = ?");
            args.push(SqlValue::Text(s.clone()));
        }
        if let Some(d) = &self.device {
            sql.push_str(" AND r.device_id = ?");
            args.push(SqlValue::Text(d.clone()));
        }
        if let Some(t) = self.since_ms {
            sql.push_str(" AND d.dead_ms >= ?");
            args.push(SqlValue::Integer(t));
        }
        if let Some(t) = self.until_ms {
            sql.push_str(" AND d.dead_ms < ?");
            args.push(SqlValue::Integer(t));
        }
        if let Some(e) = &self.error {
            sql.push_str(" AND instr(d.error, ?) > 0");
            args.push(SqlValue::Text(e.clone()));
        }
        if let Some(s) = self.after_seq {
            sql.push_str(" AND d.seq > ?");
            args.push(SqlValue::Integer(s.min(i64::MAX as u64) as i64));
        }
        (sql, args)
    }

    pub(super) fn limit_sql(&self) -> String {
        match self.limit {
            Some(n) => format!(" LIMIT {}", n.min(i64::MAX as u64)),
            None => String::new(),
        }
    }
}

/// One dead letter with its record, as listed and exported (one NDJSON line).
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The sink that gave up.
    pub sink: String,
    /// The record's seq.
    pub seq: u64,
    /// The record's device.
    pub device_id: String,
    /// Correlation id of the request that carried the record.
    pub correlation_id: String,
    /// When the gateway received the record (epoch ms).
    pub receive_ms: i64,
    /// When it was dead-lettered (epoch ms).
    pub dead_ms: i64,
    /// Delivery attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// The canonical record, exactly as the sink would receive it.
    pub record: Box<RawValue>,
}

const DEAD_COLUMNS: &str = "d.sink, d.seq, d.attempts, d.error, d.dead_ms, r.device_id, r.correlation_id, r.receive_ms, r.body";

fn dead_letter(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    let seq: u64 = row.get(1)?;
    let body: String = row.get(8)?;
    let json = splice_record(seq, &body);
    let record = RawValue::from_string(json).unwrap_or_else(|_| {
        // A damaged body (see `wal check`) is exported as a JSON string.
        serde_json::value::to_raw_value(&body).expect("a string serialises")
    });
    Ok(DeadLetter {
        sink: row.get(0)?,
        seq,
        attempts: row.get(2)?,
        error: row.get(3)?,
        dead_ms: row.get(4)?,
        device_id: row.get(5)?,
        correlation_id: row.get(6)?,
        receive_ms: row.get(7)?,
        record,
    })
}

/// How many dead letters match `f` (its `limit` ignored).
pub fn count_dead(conn: &Connection, f: &DlqFilter) -> Result<u64, WalError> {
    let (cond, args) = f.condition();
    let sql = format!("SELECT COUNT(*) FROM dead d JOIN records r ON r.seq = d.seq WHERE {cond}");
    Ok(conn.query_row(&sql, params_from_iter(args), |r| r.get(0))?)
}

/// Calls `each` for every dead letter matching `f`, in seq order, streaming
/// (memory does not grow with the number of dead letters).
pub fn for_each_dead<E: From<WalError>>(
    conn: &Connection,
    f: &DlqFilter,
    mut each: impl FnMut(DeadLetter) -> Result<(), E>,
) -> Result<(), E> {
    let (cond, args) = f.condition();
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM dead d JOIN records r ON r.seq = d.seq WHERE {cond} ORDER BY d.seq, d.sink{}",
        f.limit_sql()
    );
    let mut stmt = conn.prepare(&sql).map_err(WalError::from)?;
    let rows = stmt
        .query_map(params_from_iter(args), dead_letter)
        .map_err(WalError::from)?;
    for row in rows {
        each(row.map_err(WalError::from)?)?;
    }
    Ok(())
}

/// The dead letters matching `f`, in seq order.
pub fn list_dead(conn: &Connection, f: &DlqFilter) -> Result<Vec<DeadLetter>, WalError> {
    let mut out = Vec::new();
    for_each_dead::<WalError>(conn, f, |d| {
        out.push(d);
        Ok(())
    })?;
    Ok(out)
}
