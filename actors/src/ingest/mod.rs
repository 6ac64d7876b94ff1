//! Ingest: payload validation and the `IngestRouter` actors, one per
//! ingest thread ([`IngestRouters`]).

mod pool;
pub mod protobuf;
mod router;
pub mod validate;

pub use pool::IngestRouters;
pub use router::{
    count_reject, GetRateLimit, IngestError, IngestReceipt, IngestRouter, IngestTelemetry,
    PayloadFormat, RateLimit, RecordReceipt, SetRateLimit, SetRouting,
};
pub use validate::{IngestLimits, Rejection, Source};
