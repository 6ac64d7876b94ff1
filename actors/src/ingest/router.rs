//! `IngestRouter`: the actor that runs the shared [`IngestCore`] for the
//! MQTT ingest, one per ingest thread ([`super::IngestRouters`]).
//!
//! Handles: [`IngestTelemetry`].
//!
//! Restart policy: supervised; nothing it holds is durable. Lost on restart:
//! the rate-limit buckets (every device starts with a full bucket).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::core::{IngestCore, IngestError, IngestReceipt, IngestTelemetry};

/// The actor that runs the shared [`IngestCore`] for the MQTT ingest, on an
/// ingest thread of its own ([`super::IngestRouters`]).
pub struct IngestRouter {
    core: Arc<IngestCore>,
    /// This router forgets the core's full buckets every minute (one
    /// router of a pool does).
    sweeps: bool,
}

impl IngestRouter {
    /// A router running `core`; `sweeps`: it forgets the core's full
    /// rate-limit buckets every minute.
    pub fn new(core: Arc<IngestCore>, sweeps: bool) -> Self {
        Self { core, sweeps }
    }
}

impl Actor for IngestRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(65_536);
        if self.sweeps {
            ctx.run_interval(Duration::from_secs(60), |act, _| {
                act.core.forget_full_buckets()
            });
        }
    }
}

impl Supervised for IngestRouter {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.core
            .metrics
            .actor_restarts
            .with_label_values(&["IngestRouter"])
            .inc();
        tracing::warn!(actor = "IngestRouter", "restarting");
        self.core.clear_buckets();
    }
}

impl Message for IngestTelemetry {
    type Result = Result<IngestReceipt, IngestError>;
}
impl Handler<IngestTelemetry> for IngestRouter {
    type Result = ResponseFuture<Result<IngestReceipt, IngestError>>;

    fn handle(&mut self, msg: IngestTelemetry, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.core.ingest(msg))
    }
}
