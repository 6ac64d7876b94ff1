//! Ingest: payload validation and the `IngestRouter` actor.

mod router;
pub mod validate;

pub use router::{
    IngestError, IngestReceipt, IngestRouter, IngestTelemetry, RateLimit, RecordReceipt,
};
pub use validate::{IngestLimits, Rejection, Source};
