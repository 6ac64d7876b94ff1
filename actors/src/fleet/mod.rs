//! The fleet channel (DESIGN §11): the local control plane's commands over
//! a cloud broker, signed end to end, and the gateway's state reported there.
//!
//! Topics (QoS 1):
//! - `fleet/{gateway_id}/control/{command}` and
//!   `fleet/group/{group}/control/{command}`: signed command envelopes
//!   ([`verify`] describes the envelope, the canonical JSON and the keys).
//! - `fleet/{gateway_id}/reply/{request_id}`: the reply,
//!   `{"request_id","ok":true,"result":…}` or
//!   `{"request_id","ok":false,"error":CODE,"message":…}`, where CODE is a
//!   refusal (`unsigned`, `bad_signature`, `expired`, `replayed`,
//!   `unknown_key`, `wrong_target`, `bad_request`) or the command's own error
//!   code (`unknown_command`, `unknown_sink`…). Also sent to the MQTT 5
//!   response topic of the request, with its correlation data.
//! - `fleet/{gateway_id}/state`: retained state ([`state`]); the last will
//!   sets `{"online":false}` there.
//!
//! Acceptance, in order: a JSON object; signed (`signature` and `key_id`);
//! the key is trusted; the signature verifies; `issued_at` within ±5 min;
//! signed for this topic's target and command; a request id not accepted
//! before within the window ([`seen`], kept in `{data_dir}/fleet.db` across
//! restarts). Then the command runs through the same
//! [`Operator`](crate::control::Operator) as the local control plane, the
//! admin API and the CLI: parsed, counted and audit-logged the same way.
//! Every refusal is answered, counted in
//! `gateway_fleet_commands_total{result}` and audit-logged.
//!
//! Config bundles (`bundle.apply`, a signed config layer kept only after a
//! probation) are in [`bundle`] (the files and the life of a bundle) and
//! [`apply`] (applying by re-exec, the probation, the rollback); the state
//! reports them in its `bundle` field.

pub mod apply;
pub mod bundle;
mod client;
pub mod config;
pub mod seen;
pub mod state;
pub mod verify;

pub use apply::Bundles;
pub use bundle::BundleStore;
pub use client::{Commands, FleetClient, MIN_STATE_GAP};
pub use config::{FleetConfig, FleetKeys};
pub use seen::SeenIds;
