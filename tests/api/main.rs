//! Integration tests of the HTTP API and delivery, each on its own port and
//! data dir. Modules by area; helpers in `helpers.rs`.

mod admin;
mod archive;
mod auth;
#[allow(dead_code)]
#[path = "../mqtt/broker.rs"]
mod broker;
mod cli;
mod crash;
mod delivery;
mod deploy;
mod disk;
mod full_in;
mod health;
mod helpers;
mod ingest;
mod ops_cli;
mod package;
mod slow_clients;
mod status;
mod status_page;
mod tls;
