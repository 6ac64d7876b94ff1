//! Operating the gateway: one set of commands ([`ops`]) reachable through
//! the MQTT control plane ([`plane`]), the admin API and the CLI (both in
//! the `gateway` crate), with runtime settings persisted across restarts
//! ([`runtime`]).

pub mod ops;
pub mod plane;
pub mod runtime;

pub use ops::{Command, DevicePublisher, LogControl, OpError, Operator, OperatorParts};
pub use plane::ControlPlane;
pub use runtime::{RuntimeOverrides, Setting};
