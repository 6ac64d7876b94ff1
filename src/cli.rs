//! The `gateway` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::FlagLayer;

/// Secure, durable IoT edge gateway: MQTT/HTTP ingest → SQLite WAL → sinks.
#[derive(Debug, Parser)]
#[command(name = "gateway", version = crate_version(), about, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file (layer above the compiled defaults).
    #[arg(long, global = true, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides `gateway_id`.
    #[arg(long, global = true, value_name = "ID")]
    pub gateway_id: Option<String>,
    /// Overrides `data_dir`.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Overrides `http.addr`.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// Overrides `mqtt.url`.
    #[arg(long, global = true, value_name = "URL")]
    pub mqtt_url: Option<String>,
    /// Overrides `log.level`.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run,
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage device tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `gateway config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (all layers merged, secrets redacted).
    Print,
    /// Validate a configuration file on its own (defaults + FILE).
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// `gateway token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a fresh random token for DEVICE and its tokens-file line.
    New {
        /// The device id.
        device: String,
    },
}

impl Cli {
    /// The flag layer of the configuration.
    pub fn flags(&self) -> FlagLayer {
        FlagLayer {
            gateway_id: self.gateway_id.clone(),
            data_dir: self.data_dir.clone(),
            http_addr: self.http_addr.clone(),
            mqtt_url: self.mqtt_url.clone(),
            log_level: self.log_level.clone(),
        }
    }
}

fn crate_version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (",
        env!("GATEWAY_GIT_COMMIT"),
        ", built ",
        env!("GATEWAY_BUILD_TIME"),
        ")"
    )
}
