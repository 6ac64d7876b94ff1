//! `IngestRouters`: the shared ingest core and its routers, one per thread,
//! so that parsing, validation and enrichment use more than one core.
//!
//! An HTTP request is checked on the worker thread that read it
//! ([`IngestRouters::ingest`]): no hop through another thread before the
//! WAL. An MQTT message goes to a router ([`IngestRouters::for_device`]),
//! each an [`IngestRouter`] actor on an arbiter (thread) of its own,
//! supervised there. A device always goes to the same router (a hash of its
//! id), so its MQTT records keep their order through ingest. Every path
//! shares one [`IngestCore`]: one rate-limit bucket per device, one set of
//! routes.

use std::future::Future;
use std::sync::Arc;

use actix::prelude::*;

use super::core::{device_hash, IngestCore};
use super::router::IngestRouter;
use super::validate::{Rejection, Source};
use super::{IngestError, IngestReceipt, IngestTelemetry, RateLimit};

/// Handles to the shared core and the running routers. Cheap to clone.
#[derive(Clone)]
pub struct IngestRouters {
    core: Arc<IngestCore>,
    routers: Arc<[Addr<IngestRouter>]>,
}

impl IngestRouters {
    /// Starts `threads` routers (at least one) running `core`, each on an
    /// arbiter of its own.
    pub fn start(threads: usize, core: IngestCore) -> Self {
        let core = Arc::new(core);
        let routers: Vec<_> = (0..threads.max(1))
            .map(|i| {
                let core = core.clone();
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
                    IngestRouter::new(core, i == 0)
                })
            })
            .collect();
        Self {
            core,
            routers: routers.into(),
        }
    }

    /// The router of `device_id`.
    pub fn for_device(&self, device_id: &str) -> &Addr<IngestRouter> {
        &self.routers[(device_hash(device_id) % self.routers.len() as u64) as usize]
    }

    /// Checks `msg` on the calling thread and appends its records; resolves
    /// after the commit.
    pub fn ingest(
        &self,
        msg: IngestTelemetry,
    ) -> impl Future<Output = Result<IngestReceipt, IngestError>> + 'static {
        self.core.ingest(msg)
    }

    /// Counts and logs a refusal made before the core saw the payload
    /// ([`IngestCore::reject`]).
    pub fn reject(&self, source: Source, device_id: &str, correlation_id: &str, r: &Rejection) {
        self.core.reject(source, device_id, correlation_id, r)
    }

    /// The per-device rate limit in force.
    pub fn rate_limit(&self) -> RateLimit {
        self.core.rate_limit()
    }

    /// Sets the per-device rate limit (every bucket starts over full).
    pub fn set_rate_limit(&self, rate: RateLimit) {
        self.core.set_rate_limit(rate)
    }

    /// Replaces the routes and priority rules.
    pub fn set_routing(&self, routing: Arc<crate::route::Routing>) {
        self.core.set_routing(routing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_always_goes_to_the_same_router_and_devices_spread() {
        let sys = actix::System::new();
        sys.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let wal = crate::wal::start_test_store(dir.path());
            let core = IngestCore::new(
                wal,
                "gw",
                Default::default(),
                RateLimit::OFF,
                Arc::default(),
                crate::Metrics::unregistered(),
            );
            let routers = IngestRouters::start(4, core);
            assert_eq!(routers.routers.len(), 4);
            let mut used = std::collections::HashSet::new();
            for i in 0..200 {
                let id = format!("dev-{i}");
                let a = routers.for_device(&id).clone();
                assert!(a == *routers.for_device(&id));
                used.insert(routers.routers.iter().position(|r| *r == a).unwrap());
            }
            assert_eq!(used.len(), 4, "200 devices spread over every router");
            routers.set_rate_limit(RateLimit {
                per_second: 3.0,
                burst: 6.0,
            });
            assert_eq!(routers.rate_limit().per_second, 3.0);
        });
    }

    fn telemetry(source: crate::ingest::Source, device: &str, n: u32) -> IngestTelemetry {
        IngestTelemetry {
            source,
            device_id: device.into(),
            payload: format!(r#"{{"ts":1,"metrics":{{"t":1}},"msg_id":"{n}"}}"#).into(),
            payload_format: crate::ingest::PayloadFormat::Json,
            correlation_id: format!("c{n}"),
            idempotency_key: None,
            traceparent: None,
            topic_tags: Vec::new(),
            span: tracing::Span::none(),
        }
    }

    #[test]
    fn a_device_has_one_rate_limit_bucket_whether_its_records_come_direct_or_through_its_router() {
        use crate::ingest::Source::{Http, Mqtt};
        let sys = actix::System::new();
        sys.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let wal = crate::wal::start_test_store(dir.path());
            let burst = RateLimit {
                per_second: 0.001,
                burst: 2.0,
            };
            // Answered once the store has started its writer thread.
            wal.stats().await.unwrap();
            let core = IngestCore::new(
                wal,
                "gw",
                Default::default(),
                burst,
                Arc::default(),
                crate::Metrics::unregistered(),
            );
            let routers = IngestRouters::start(2, core);
            for n in 0..2 {
                routers.ingest(telemetry(Http, "d", n)).await.unwrap();
            }
            // The burst is spent on the direct path: the router refuses too.
            let through_router = routers.for_device("d").send(telemetry(Mqtt, "d", 2));
            assert!(matches!(
                through_router.await.unwrap(),
                Err(IngestError::RateLimited { .. })
            ));
            let other = routers.for_device("e").send(telemetry(Mqtt, "e", 3));
            assert!(
                other.await.unwrap().is_ok(),
                "another device has its own bucket"
            );
        });
    }
}
