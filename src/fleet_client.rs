//! The operator's client of the fleet broker, shared by `gateway fleet
//! send`/`status` ([`crate::fleet_cli`]) and `gateway fleet rollout`
//! ([`crate::fleet_rollout`]): the same [`MqttClient`] as the gateway
//! (TLS, mTLS, credentials from files), with a clean session of its own.

use gateway_actors::mqtt::client::{ClientOptions, Event, MqttClient};
use gateway_actors::mqtt::{BrokerKeys, MqttVersion};

use crate::cli::FleetBroker;

/// A clean-session client of the fleet broker subscribed to `filters`.
pub fn connect_filters(
    b: &FleetBroker,
    filters: Vec<String>,
) -> anyhow::Result<(MqttClient, tokio::sync::mpsc::Receiver<Event>)> {
    let client_id = format!(
        "fleet-cli-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let conn = BrokerKeys {
        url: &b.url,
        ca_file: b.ca_file.as_ref(),
        client_cert_file: b.client_cert_file.as_ref(),
        client_key_file: b.client_key_file.as_ref(),
        username: b.username.as_deref(),
        password_file: b.password_file.as_ref(),
        version: None,
    }
    .connection(&client_id, MqttVersion::V5)
    .map_err(|e| anyhow::anyhow!("--{}: {}", e.key.replace('_', "-"), e.message))?;
    let mut opts = ClientOptions::new(conn);
    opts.subscribe = filters;
    MqttClient::connect(&opts).map_err(anyhow::Error::msg)
}
