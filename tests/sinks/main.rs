//! Sinks against real servers started by the harness: S3 (moto), Kafka
//! (tansu), a cloud Mosquitto, and an analytics API that can be told to fail.

mod analytics;
#[allow(dead_code)]
#[path = "../mqtt/broker.rs"]
mod broker;
mod crash;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod http;
mod kafka;
mod mqtt;
mod reduce;
mod routes;
mod s3;
mod secrets;
mod uplink;
