//! The `gateway` binary's library: configuration, CLI, HTTP API, start-up
//! and logging. The actors live in the `gateway-actors` crate.
//!
//! # Layout
//!
//! - [`config`]: layered configuration validated into `Settings`.
//! - [`auth`]: device tokens, protected mode, admin credentials.
//! - `broker`: the embedded MQTT broker (feature `embedded-broker`).
//! - [`http`]: ingest, health, version, metrics and admin endpoints.
//! - [`startup`]: wiring the supervised actors and the HTTP server.
//! - [`status`]: the status document (`GET /admin/status`, the status page
//!   at `/`, `gateway status`).
//! - [`telemetry`]: JSON logging.
//! - [`cli`]: the `gateway` subcommands; [`ops_cli`] runs the operator ones
//!   (offline on the data dir, or through a running gateway's admin API;
//!   how results print is its room `ops_cli/show.rs`).
//! - [`fleet_cli`]: `gateway fleet keygen | sign | send | status`, the
//!   operator's side of the fleet channel.
//! - [`bundles`]: fleet config bundles: the layer a start runs with, the
//!   re-exec that applies or rolls one back.
//! - [`fleet_rollout`]: `gateway fleet rollout`, a bundle wave by wave.
//! - [`lock`]: one process per data dir.
//! - [`healthcheck`]: `gateway healthcheck`; [`sdnotify`]: systemd readiness
//!   and watchdog.

pub mod auth;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod bundles;
pub mod cli;
pub mod config;
pub mod fleet_cli;
pub mod fleet_client;
pub mod fleet_rollout;
pub mod fuzzing;
pub mod healthcheck;
pub mod http;
pub mod lock;
pub mod ops_cli;
pub mod sdnotify;
pub mod startup;
pub mod status;
pub mod telemetry;

/// Version, git commit and build time, as served on `/version`.
pub fn version_info() -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "git_commit": env!("GATEWAY_GIT_COMMIT"),
        "build_time": env!("GATEWAY_BUILD_TIME"),
    })
}
