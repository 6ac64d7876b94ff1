//! MQTT ingest against a real Mosquitto started by the harness (and the
//! embedded broker).

mod broker;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod ingest;
