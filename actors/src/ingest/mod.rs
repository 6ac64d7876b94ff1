//! Ingest: payload validation, the shared [`IngestCore`] and the
//! `IngestRouter` actors, one per ingest thread ([`IngestRouters`]).

mod pool;
pub mod protobuf;
mod router;
pub mod validate;

pub use pool::IngestRouters;
pub use router::{
    count_reject, IngestCore, IngestError, IngestReceipt, IngestRouter, IngestTelemetry,
    PayloadFormat, RateLimit, RecordReceipt,
};
pub use validate::{IngestLimits, Rejection, Source};
