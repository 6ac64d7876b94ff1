//! Ingest: payload validation, the shared [`IngestCore`] and the
//! `IngestRouter` actors, one per ingest thread ([`IngestRouters`]).

mod core;
mod pool;
pub mod protobuf;
mod router;
pub mod validate;

pub use core::{
    IngestCore, IngestError, IngestReceipt, IngestTelemetry, PayloadFormat, RateLimit,
    RecordReceipt,
};
pub use pool::IngestRouters;
pub use router::IngestRouter;
pub use validate::{IngestLimits, Rejection, Source};
