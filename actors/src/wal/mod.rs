//! The write-ahead-log queue: every record the gateway acknowledges lives here
//! until every sink has it.
//!
//! # On-disk format
//!
//! One SQLite database, `{data_dir}/wal.db`, in WAL journal mode with
//! `synchronous=FULL`: a commit returns only after the WAL file is fsync'd.
//!
//! The schema (`schema.sql`, the one copy, applied at every open):
//!
//! ```sql
#![doc = include_str!("schema.sql")]
//! ```
//!
//! # Delivery state per sink
//!
//! A record is, for each configured sink, in exactly one state:
//! - **Acked** or **Dead** ("finished"): `seq <= cursor`, or inside a
//!   `sink_done` range; Dead ones also have a `dead` row.
//! - **InFlight**: handed to the sink by [`Wal::fetch`] and not yet finished.
//!   InFlight is held in memory only: a restart turns every InFlight record
//!   back into Enqueued, which is exactly the crash recovery step — nothing
//!   needs rewriting at start-up.
//! - **Enqueued**: everything else above the cursor.
//!
//! The stored form is two integers per sink plus one row per out-of-order
//! range, so the cost of delivery state does not grow with the ingest rate.
//! A sink that appears in the configuration for the first time starts at the
//! current head: it receives records appended from then on.
//!
//! # Routes, classes and expiry (DESIGN §6a)
//!
//! Each record carries its class (`records.class`: 0 high, 1 normal, 2
//! low) and the set of sinks it goes to (`records.sinks`, one bit per sink,
//! NULL for every sink), decided by the router once, when it is stored:
//! recovery re-reads them, nothing re-decides. A sink's bit (`sinks.bit`)
//! is given the first time the sink is configured and kept while it is.
//! Delivery state stays "cursor + done ranges": a record the sink's route
//! did not take is finished for that sink when a fetch passes it (nothing
//! is written per record at append time), so a sink that takes a few
//! records of many still moves its cursor through the rest.
//!
//! [`Wal::fetch`] takes, for one sink, the Enqueued records in (class, seq)
//! order: `high` through the partial index `records_prio`, then `normal`
//! in seq order (finishing what the route did not take), then `low`
//! through the index. With `live_first`, while the oldest Enqueued record
//! is older than `live_after`, each class is served live records first
//! (received within `live_after`; the boundary is found by binary search on
//! seq) and its backlog after. Per sink and class a scan hint remembers how
//! far everything is taken, so a long priority drain does not re-read what
//! it passed; any record going back to Enqueued resets the hints.
//!
//! A priority drain finishes records out of seq order: the done ranges
//! hold one range per run of delivered `high` records until the lower
//! classes catch up, then merge into the cursor.
//!
//! TTLs (`expiry.rs`): a record not delivered to a sink within its class's
//! TTL becomes that sink's dead letter with error `expired`; a per-sink,
//! per-class mark (`meta` key `ttl/SINK/CLASS`) keeps what was judged, so
//! a requeued expired record is delivered, not expired again. Requeue and
//! replay deliver to the named sink whatever its route says (the reopened
//! ranges are kept in `sink_forced` until the cursor passes them).
//!
//! A database of schema 1 is migrated in place at open: old records are
//! `normal` and go to every sink.
//!
//! # Invariants (checked by the model tests: 1–6 in `tests/wal_model.rs`, 6 and 7 with compaction in `tests/wal_compaction_model.rs`, routes and class order in `tests/wal_routes.rs`)
//!
//! 1. An append that returned `Ok` survives a crash (kill -9, power loss) and
//!    is fetched by every sink until that sink acks it or marks it dead.
//! 2. `fetch` returns records in (class, seq) order — with `live_first`
//!    live records first within a class — only records routed to the sink
//!    (or reopened for it), never a record that is finished or InFlight for
//!    that sink, and never more than asked for.
//! 3. `ack` and `dead` are idempotent; finished is final for a sink until an
//!    operator requeues the dead letter or replays the record (then it is
//!    Enqueued again, and the next ack or dead of its range finishes it).
//! 4. After a restart no record is InFlight.
//! 5. An idempotency key seen within the dedup window yields the original
//!    `seq` and correlation id and stores nothing.
//! 6. `seq` never goes backwards, even after every record was compacted
//!    (`meta.seq_floor`), and a failed group commit does not consume seqs.
//! 7. Compaction removes a record only when every configured sink finished
//!    it, it is no sink's dead letter, and it is older than
//!    `max(retention, dedup_window)` or the WAL is above 90 % of `max_bytes`
//!    (then delivered records give way early, oldest first).
//!
//! # Group commit
//!
//! [`WalStore`] runs the [`Wal`] on a dedicated thread, and every caller
//! queues to it through a [`WalWriter`]. The thread takes every
//! request waiting in its queue, applies all writes (appends, acks, dead
//! letters) in one transaction, commits once (one fsync), then answers the
//! waiting callers and serves reads (fetches, stats). Under load the queue
//! fills while the previous commit is in fsync, so group size grows with
//! concurrency and the fsync cost is shared.
//!
//! # Recovery
//!
//! Opening the database recovers it (SQLite replays or discards its own WAL
//! file); the [`Wal`] then reloads cursors and done ranges, sets the next seq
//! above both the highest stored record and `seq_floor`, and starts with
//! nothing InFlight.
//!
//! # Rooms
//!
//! - `engine.rs`: the types, [`Wal::open`] and recovery; `error.rs`:
//!   [`WalError`].
//! - `append.rs`: appends with dedup, and the group write (one transaction,
//!   one commit for appends, acks, dead letters and releases).
//! - `sink_state.rs`: a sink's delivery state (cursor + done ranges) and
//!   how it is loaded and stored.
//! - `delivery.rs`: fetch, ack, dead and release on that state;
//!   acknowledgements held in memory (`wal.ack_flush`); `stats.rs`: the
//!   counts (`stats`) and the backlog per class, scanned off the writer.
//! - `space.rs`: the size counted against `max_bytes`, free disk,
//!   backpressure and compaction.
//! - `expiry.rs`: per-sink TTLs.
//! - `admin.rs`: operator commands (below); `dlq.rs`: dead letters read
//!   (the filter, list, count, export).
//! - `writer.rs`: the writer thread (group commits, the commit window,
//!   housekeeping); `handle.rs`: the one handle to it ([`WalWriter`]:
//!   append, fetch, ack, dead, release, stats, operator actions, the
//!   append signal), which every caller holds; `queue.rs`: the requests
//!   the thread takes and the [`WalHealth`] that holds its queue;
//!   `store.rs`: the actor that supervises the thread ([`WalStore`]);
//!   `reader.rs`: read-only connections ([`WalReader`]); `ranges.rs`.
//!
//! # Operator actions
//!
//! Dead letters (requeue, purge), replay of a time range to one sink, the
//! consistency check with safe repair, and compaction on demand live in
//! `admin.rs` (listing and exporting dead letters in `dlq.rs`); see its module doc for how requeue and replay
//! reopen finished records without leaving the cursor + ranges form. They
//! run on the writer thread ([`WalWriter::with`]); read-only listings go through
//! [`WalReader`]. The model test exercises requeue, purge and replay, and
//! runs the consistency check after every step.
//!
//! # Backpressure and retention
//!
//! Only data that some sink still needs may hold back ingest. Above 90 % of
//! `max_bytes` (the database pages holding data; SQLite's own `-wal` journal
//! is bounded separately) housekeeping compacts delivered records before
//! their retention ends, oldest first, until the WAL is back under that
//! mark; and an append that finds the WAL over `max_bytes` first makes room
//! the same way. Backpressure is on only while the WAL stays above
//! `max_bytes` with nothing delivered left to remove, or while free disk is
//! below `min_free_disk_bytes`: with policy `block` appends are then refused
//! until delivery or space frees room; with `drop_oldest` the oldest records
//! are deleted (counted) and every sink's cursor moves past them.

mod admin;
mod append;
mod checkpoint;
mod delivery;
mod dlq;
mod engine;
mod error;
mod expiry;
mod handle;
mod idem;
mod queue;
mod ranges;
mod reader;
mod sink_state;
mod space;
mod stats;
mod store;
mod writer;

pub use admin::{integrity_report, CheckReport, Problem, ReplayOutcome};
pub use dlq::{
    count_dead, for_each_dead, list_dead, parse_time_ms, time_ms, DeadLetter, DlqFilter,
};
pub use engine::{
    now_ms, splice_record, AppendOutcome, BackpressurePolicy, Batch, Fetched, NewRecord, SinkStats,
    StoredRecord, Wal, WalConfig, WalStats, WriteOp, WriteResult,
};
pub use error::WalError;
pub use expiry::EXPIRED;
pub use handle::{WalWriter, WeakWalWriter};
pub use queue::WalHealth;
pub use ranges::RangeSet;
pub use reader::WalReader;
#[cfg(feature = "fault-injection")]
pub use store::InjectWriterPanic;
pub use store::WalStore;

/// A `WalStore` on a fresh WAL in `dir` with unregistered metrics, started
/// on the current arbiter, and its handle (unit tests of its callers).
#[cfg(test)]
pub(crate) fn start_test_store(dir: &std::path::Path) -> WalWriter {
    use actix::Actor as _;
    let wal = Wal::open(WalConfig::new(dir.join("w.db"), &[])).expect("a WAL in a temp dir");
    let health = std::sync::Arc::new(WalHealth::default());
    let store = WalStore::new(wal, crate::Metrics::unregistered(), health.clone()).start();
    WalWriter::new(store, health)
}
