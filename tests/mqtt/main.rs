//! MQTT ingest against a real Mosquitto started by the harness (and the
//! embedded broker).

mod broker;
mod control;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod ingest;
mod rotation;
