//! The dispatcher's side of report-by-exception (`crate::reduce`): a
//! fetched batch is reduced once (a retry sends the same reduced batch),
//! the reduction state is read from the WAL at start and taken by the
//! reducer only after the batch's ack (which stores it) was accepted, and
//! [`SetReduce`] changes the settings at run time.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::Span;

use super::Dispatcher;
use crate::reduce::{Reduce, Reducer};
use crate::wal::Batch;

impl Dispatcher {
    /// Delivers a fetched batch: reduces it if the sink reports by
    /// exception (once: a retry sends the same reduced batch), then
    /// publishes it. A batch reduced to nothing is acked at once.
    pub(super) fn deliver(&mut self, batch: Batch, span: Span, ctx: &mut Context<Self>) {
        let batch = Arc::new(batch);
        let wire = match self.reducer.as_ref().filter(|r| r.active()) {
            Some(r) => {
                let mut step = r.reduce(&batch);
                let wire = Arc::new(std::mem::take(&mut step.wire));
                self.step = Some(step);
                wire
            }
            None => {
                self.step = None;
                batch.clone()
            }
        };
        if wire.records.is_empty() {
            self.observe_e2e(&batch);
            self.ack(batch, span, 0, ctx);
        } else {
            self.publish(batch, wire, span, 1, 0, ctx);
        }
    }

    /// Reads the reduction state stored with this sink's acks (at start and
    /// after a restart); fetching waits for it.
    pub(super) fn load_reducer(&mut self, ctx: &mut Context<Self>) {
        let sink = self.cfg.sink.clone();
        ctx.spawn(
            self.wal
                .with(move |w| w.reduce_rows(&sink))
                .into_actor(self)
                .map(|res, act, ctx| {
                    let error = match res {
                        Ok(rows) => {
                            let cfg = act.cfg.reduce.clone();
                            act.reducer = Some(Reducer::load(&act.cfg.sink, cfg, rows));
                            return;
                        }
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(sink = %act.cfg.sink, error = %error, "cannot read the reduction state; trying again");
                    ctx.run_later(Duration::from_secs(1), |act, ctx| act.load_reducer(ctx));
                }),
        );
    }

    /// The batch's ack was taken by the WAL, with its reduction state rows:
    /// the reducer moves on to that state.
    pub(super) fn commit_step(&mut self) {
        let (Some(step), Some(r)) = (self.step.take(), self.reducer.as_mut()) else {
            return;
        };
        let c = step.counts;
        let sink = self.cfg.sink.as_str();
        for (kind, n) in [
            ("deadband", c.deadband),
            ("downsample", c.downsample),
            ("record", c.records),
        ] {
            if n > 0 {
                self.metrics
                    .sink_reduced
                    .with_label_values(&[sink, kind])
                    .inc_by(n);
            }
        }
        r.commit(step);
    }
}

/// Sets or clears report-by-exception at run time (`config.set
/// sinks.NAME.reduce`): the windows open under the old settings are sent
/// with the next record.
pub struct SetReduce(pub Option<Reduce>);
impl Message for SetReduce {
    type Result = ();
}
impl Handler<SetReduce> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetReduce, _: &mut Context<Self>) {
        tracing::info!(sink = %self.cfg.sink, reduce = ?msg.0.as_ref().map(Reduce::to_json), "sink reduction changed");
        if let Some(r) = &mut self.reducer {
            r.set_config(msg.0.clone());
        }
        self.cfg.reduce = msg.0;
    }
}
