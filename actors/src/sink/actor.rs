//! `SinkActor`: one per configured sink; owns the sink's client.
//!
//! Role: runs [`Sink::publish`] for the batches its `Dispatcher` hands it.
//! A panic inside a publish is caught, answered as a retryable error, and the
//! actor stops itself so its supervisor builds a fresh client.
//!
//! Handles: [`PublishBatch`], [`Rebuild`]. Sends nothing.
//!
//! Restart policy: supervised, rebuilt from its [`SinkFactory`]; each restart
//! moves `gateway_actor_restarts_total{actor="SinkActor"}`. Lost on restart:
//! the client and its connections. Nothing durable: the batch being
//! published stays InFlight in the WAL and the dispatcher retries it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::FutureExt;
use tracing::Instrument as _;

use super::{Sent, Sink, SinkError};
use crate::metrics::Metrics;
use crate::wal::Batch;

/// Builds the sink's client; called at start and on every restart.
pub type SinkFactory = Arc<dyn Fn() -> Result<Box<dyn Sink>, SinkError> + Send + Sync>;

/// The actor around one sink.
pub struct SinkActor {
    /// The sink's name, for logs and metric labels.
    name: String,
    /// Builds the client: at start, after a restart, and on a TLS reload
    /// (it reads the TLS files again), so a client is never kept past them.
    factory: SinkFactory,
    /// The client; `None` until one could be built (a target that is down
    /// at start is retried with the next batch) and after a restart, which
    /// drops a client that may be in a bad state.
    sink: Option<Box<dyn Sink>>,
    metrics: Metrics,
}

impl SinkActor {
    /// A sink actor named `name` whose client comes from `factory`.
    pub fn new(name: &str, factory: SinkFactory, metrics: Metrics) -> Self {
        Self {
            name: name.to_string(),
            factory,
            sink: None,
            metrics,
        }
    }

    fn ensure_sink(&mut self) -> Result<&mut Box<dyn Sink>, SinkError> {
        if self.sink.is_none() {
            self.sink = Some((self.factory)()?);
        }
        self.sink
            .as_mut()
            .ok_or_else(|| SinkError::Config("sink not built".into()))
    }
}

impl Actor for SinkActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if let Err(e) = self.ensure_sink() {
            tracing::error!(sink = %self.name, error = %e, "sink client cannot be built; will retry on the next batch");
        }
    }
}

impl Supervised for SinkActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.metrics
            .actor_restarts
            .with_label_values(&["SinkActor"])
            .inc();
        tracing::warn!(actor = "SinkActor", sink = %self.name, "restarting sink");
        self.sink = None;
    }
}

/// Builds the sink's client again from its factory, which reads its TLS
/// files again (certificate rotation: `tls.reload`, SIGHUP). A client that
/// cannot be built is refused and the current one stays. A batch in flight
/// on the old client fails as unavailable and is published again on the new
/// one (at least once).
pub struct Rebuild;
impl Message for Rebuild {
    type Result = Result<(), String>;
}
impl Handler<Rebuild> for SinkActor {
    type Result = Result<(), String>;

    fn handle(&mut self, _: Rebuild, _: &mut Context<Self>) -> Self::Result {
        let fresh = (self.factory)().map_err(|e| e.to_string())?;
        self.sink = Some(fresh);
        tracing::info!(sink = %self.name, "sink client rebuilt with its TLS files read again");
        Ok(())
    }
}

/// Delivers one batch to the sink's target.
pub struct PublishBatch {
    /// The batch (shared with the dispatcher, which may retry it).
    pub batch: Arc<Batch>,
    /// The attempt's `sink.publish` span (`Span::none()` when traces are
    /// off): current while the sink publishes, so it can pass it on.
    pub span: tracing::Span,
}
impl Message for PublishBatch {
    type Result = Result<Sent, SinkError>;
}
impl Handler<PublishBatch> for SinkActor {
    type Result = ResponseActFuture<Self, Result<Sent, SinkError>>;

    fn handle(&mut self, msg: PublishBatch, _: &mut Context<Self>) -> Self::Result {
        let fut = match self.ensure_sink() {
            Ok(sink) => {
                let (batch, span) = (msg.batch, msg.span);
                let made = span.in_scope(|| {
                    std::panic::catch_unwind(AssertUnwindSafe(|| sink.publish(batch)))
                });
                match made {
                    Ok(f) => AssertUnwindSafe(f.instrument(span))
                        .catch_unwind()
                        .boxed_local(),
                    Err(p) => async move { Err(p) }.boxed_local(),
                }
            }
            Err(e) => {
                // A client that cannot be built now (target missing, DNS down)
                // may work later: the dispatcher retries with backoff.
                let err = match e {
                    SinkError::Config(m) => {
                        SinkError::Retryable(format!("cannot build the sink client: {m}"))
                    }
                    other => other,
                };
                async move { Ok(Err(err)) }.boxed_local()
            }
        };
        Box::pin(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(r) => {
                let error = r.as_ref().err().map(ToString::to_string);
                act.metrics.sink_last_error.set(&act.name, error.as_deref());
                if let Ok(sent) = &r {
                    act.metrics
                        .sink_sent_bytes
                        .with_label_values(&[&act.name])
                        .inc_by(sent.wire_bytes);
                    act.metrics
                        .sink_payload_bytes
                        .with_label_values(&[&act.name])
                        .inc_by(sent.payload_bytes);
                }
                r
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(sink = %act.name, panic = %what, "sink panicked; restarting it");
                ctx.stop();
                let err = SinkError::Retryable(format!("sink panicked: {what}"));
                act.metrics
                    .sink_last_error
                    .set(&act.name, Some(&err.to_string()));
                Err(err)
            }
        }))
    }
}
