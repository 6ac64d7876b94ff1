//! The gateway's actors and their messages.
//!
//! # Layout
//!
//! - [`ingest`]: payload validation (`validate`) and `IngestCore`, the one
//!   door into the WAL for HTTP and MQTT (the `IngestRouter` actors run it
//!   for MQTT).
//! - [`wal`]: the SQLite write-ahead-log queue — the `Wal` engine (format,
//!   invariants and recovery are documented there), its writer thread that
//!   group-commits, the `WalWriter` handle every caller (ingest,
//!   dispatchers, operator) queues to that thread through, and the
//!   `WalStore` actor that supervises (starts and restarts) the thread.
//! - [`durable`]: directories created and synced so that a power cut
//!   cannot take them (and what is below them) away.
//! - [`dispatcher`]: one `Dispatcher` per sink: fetch, publish, ack, retry
//!   with backoff, dead-letter; its settings (`config.rs`), uplink gating
//!   (`gate.rs`), reduction glue (`reduction.rs`) and operator messages
//!   (`admin.rs`) are rooms of their own.
//! - [`uplink`] and [`reduce`]: what a sink may send and when (byte
//!   budget, quota, send windows) and report-by-exception (deadband,
//!   downsample; its settings in `reduce/settings.rs`), applied by its
//!   dispatcher.
//! - [`sink`]: the `Sink` trait, the `SinkActor` that runs one, and one
//!   folder per sink kind.
//! - [`mqtt`]: the `MqttIngest` actor: QoS 1, persistent session, PUBACK
//!   only after the WAL commit.
//! - [`control`]: operator commands (`Operator`), the MQTT `ControlPlane`
//!   and runtime settings persisted in the data dir.
//! - [`fleet`]: the `FleetClient`: signed commands from the fleet broker,
//!   run by the same `Operator`, and the state reported there.
//! - [`backoff`]: the one retry policy with jitter (MQTT reconnects, sink
//!   retries and circuit probes).
//! - [`keys`]: the error a section's own validation returns (`KeyError`).
//! - [`metrics`]: the Prometheus metrics every actor moves.
//! - [`repeats`]: rate limits for repeated log events (one broken device
//!   or a sink that stays down cannot flood the log).
//! - [`secret`]: the one `Secret` type (redacted wherever it could print)
//!   and the one reader of secret files.
//! - [`trace`]: the pipeline spans (`ingest` … `sink.publish`) and the W3C
//!   `traceparent` they travel with; off unless the binary exports traces.
//!
//! Every guarantee comes from the WAL: actor mailboxes are not durable, so an
//! ingest is answered only after the WAL's writer thread committed it, and a batch is
//! finished for a sink only after the sink acknowledged it.
//!
//! This crate never depends on actix-web: HTTP lives in the `gateway` crate.

#![deny(missing_docs)]

pub mod backoff;
pub mod control;
pub mod dispatcher;
pub mod durable;
pub mod fleet;
pub mod fuzzing;
pub mod growth;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod mqtt;
pub mod reduce;
pub mod repeats;
pub mod route;
pub mod secret;
pub mod sink;
pub mod trace;
pub mod uplink;
pub mod wal;

pub use metrics::Metrics;
pub use secret::Secret;
