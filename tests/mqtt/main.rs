//! MQTT ingest, the control plane and the fleet channel against a real
//! Mosquitto started by the harness (and the embedded broker).

mod broker;
mod bundles;
mod control;
mod fleet;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod ingest;
mod rotation;
