//! `IngestRouters`: the ingest routers, one per thread, so that parsing,
//! validation and enrichment use more than one core.
//!
//! Each [`IngestRouter`] runs on an arbiter (thread) of its own, supervised
//! there. A device always goes to the same router (a hash of its id), so its
//! records keep their order through ingest and its rate-limit bucket lives in
//! one place. Runtime settings (rate limit, routes) go to every router.

use std::sync::Arc;

use actix::prelude::*;

use super::router::{IngestRouter, RateLimit, SetRateLimit, SetRouting};

/// Handles to the running routers. Cheap to clone.
#[derive(Clone)]
pub struct IngestRouters(Arc<[Addr<IngestRouter>]>);

impl IngestRouters {
    /// Starts `threads` routers (at least one), each built by `make` on an
    /// arbiter of its own.
    pub fn start(threads: usize, make: impl Fn() -> IngestRouter + Send + Sync + 'static) -> Self {
        let make = Arc::new(make);
        let routers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let make = make.clone();
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| make())
            })
            .collect();
        Self(routers.into())
    }

    /// The router of `device_id` (FNV-1a of the id: stable for a process).
    pub fn for_device(&self, device_id: &str) -> &Addr<IngestRouter> {
        let h = device_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        &self.0[(h % self.0.len() as u64) as usize]
    }

    /// Sets the per-device rate limit on every router.
    pub async fn set_rate_limit(&self, rate: RateLimit) -> Result<(), MailboxError> {
        for r in self.0.iter() {
            r.send(SetRateLimit(rate)).await?;
        }
        Ok(())
    }

    /// Replaces the routes and priority rules on every router.
    pub async fn set_routing(
        &self,
        routing: Arc<crate::route::Routing>,
    ) -> Result<(), MailboxError> {
        for r in self.0.iter() {
            r.send(SetRouting(routing.clone())).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::GetRateLimit;

    #[test]
    fn a_device_always_goes_to_the_same_router_and_devices_spread() {
        let sys = actix::System::new();
        sys.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (wal, health) = crate::wal::start_test_store(dir.path());
            let make = move || {
                IngestRouter::new(
                    wal.clone(),
                    health.clone(),
                    "gw",
                    Default::default(),
                    RateLimit::OFF,
                    Arc::default(),
                    crate::Metrics::unregistered(),
                )
            };
            let routers = IngestRouters::start(4, make);
            assert_eq!(routers.0.len(), 4);
            let mut used = std::collections::HashSet::new();
            for i in 0..200 {
                let id = format!("dev-{i}");
                let a = routers.for_device(&id).clone();
                assert!(a == *routers.for_device(&id));
                used.insert(routers.0.iter().position(|r| *r == a).unwrap());
            }
            assert_eq!(used.len(), 4, "200 devices spread over every router");
            routers
                .set_rate_limit(RateLimit {
                    per_second: 3.0,
                    burst: 6.0,
                })
                .await
                .unwrap();
            for r in routers.0.iter() {
                assert_eq!(r.send(GetRateLimit).await.unwrap().per_second, 3.0);
            }
        });
    }
}
