//! The `[fleet]` section: its keys ([`FleetKeys`]) and what they build
//! ([`FleetConfig`]). The fleet is off while `url` is absent.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::verify::TrustedKeys;
use crate::ingest::validate::is_valid_device_id;
use crate::keys::{duration_key, KeyError};
use crate::mqtt::client::{Backoff, Connection};
use crate::mqtt::{BrokerKeys, MqttVersion};

/// The `[fleet]` keys, as written. The defaults are in the gateway's
/// `config/default.toml` (the lowest layer, so every key without an
/// `Option` is always there); an `Option` key has no default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetKeys {
    /// The fleet broker, `mqtt://host:port` or `mqtts://host:port`; absent:
    /// no fleet channel.
    pub url: Option<String>,
    /// Static group membership: group commands on
    /// `fleet/group/{group}/control/+` reach this gateway.
    pub groups: Vec<String>,
    /// Ed25519 public keys that may sign commands, one `KEY_ID BASE64` a
    /// line (required with `url`).
    pub trusted_keys_file: Option<PathBuf>,
    /// How long a new config bundle must stay healthy before it is kept
    /// (ready, connected to the fleet broker, every sink that was up still
    /// up; see [`super::apply`]).
    pub probation: String,
    /// The state is published at least this often (and on change), at
    /// least 1s.
    pub state_interval: String,
    /// Client id (default `gateway-{gateway_id}-fleet`).
    pub client_id: Option<String>,
    /// `5` (default: replies also go to the MQTT 5 response topic) or `3.1.1`.
    pub version: Option<String>,
    /// CA file (`mqtts` only).
    pub ca_file: Option<PathBuf>,
    /// Client certificate file for mutual TLS (`mqtts` only).
    pub client_cert_file: Option<PathBuf>,
    /// Client key file for mutual TLS (`mqtts` only).
    pub client_key_file: Option<PathBuf>,
    /// User name.
    pub username: Option<String>,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
}

/// The fleet channel's validated settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The fleet broker: clean session, reconnects like the MQTT ingest
    /// (200 ms doubling to 30 s, with jitter).
    pub conn: Connection,
    /// This gateway's id (its topics).
    pub gateway_id: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Who may sign commands.
    pub trusted: TrustedKeys,
    /// Config bundle probation ([`super::apply`]).
    pub probation: Duration,
    /// The state is published at least this often.
    pub state_interval: Duration,
    /// `wal.max_bytes`, reported with the WAL's size.
    pub wal_limit: u64,
}

impl FleetConfig {
    /// `fleet/{gateway_id}/state`.
    pub fn state_topic(&self) -> String {
        format!("fleet/{}/state", self.gateway_id)
    }

    /// The command subscriptions: this gateway's and its groups'.
    pub fn filters(&self) -> Vec<String> {
        std::iter::once(format!("fleet/{}/control/+", self.gateway_id))
            .chain(
                self.groups
                    .iter()
                    .map(|g| format!("fleet/group/{g}/control/+")),
            )
            .collect()
    }
}

impl FleetKeys {
    /// Validates the keys: `None` when the fleet is off (no `url`).
    /// `wal_limit` is `wal.max_bytes`.
    pub fn build(&self, gateway_id: &str, wal_limit: u64) -> Result<Option<FleetConfig>, KeyError> {
        let Some(url) = self.url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("gateway-{gateway_id}-fleet"));
        let mut conn = BrokerKeys {
            url,
            ca_file: self.ca_file.as_ref(),
            client_cert_file: self.client_cert_file.as_ref(),
            client_key_file: self.client_key_file.as_ref(),
            username: self.username.as_deref(),
            password_file: self.password_file.as_ref(),
            version: self.version.as_deref(),
        }
        .connection(&client_id, MqttVersion::V5)?;
        conn.reconnect = Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
        };
        let groups = self.groups.clone();
        if let Some(g) = groups.iter().find(|g| !is_valid_device_id(g)) {
            return Err(KeyError::new(
                "groups",
                format!("{g:?}: a group name must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$"),
            ));
        }
        let Some(keys_file) = &self.trusted_keys_file else {
            return Err(KeyError::new(
                "trusted_keys_file",
                "is required with fleet.url: every fleet command is signed (`gateway fleet keygen`)",
            ));
        };
        let trusted =
            TrustedKeys::load(keys_file).map_err(|e| KeyError::new("trusted_keys_file", e))?;
        let probation = duration_key("probation", &self.probation)?;
        let state_interval = duration_key("state_interval", &self.state_interval)?;
        if state_interval < Duration::from_secs(1) {
            return Err(KeyError::new("state_interval", "must be at least 1s"));
        }
        Ok(Some(FleetConfig {
            conn,
            gateway_id: gateway_id.to_string(),
            groups,
            trusted,
            probation,
            state_interval,
            wal_limit,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[fleet]` keys as `config/default.toml` gives them (the
    /// gateway's config tests check that file against these values).
    fn defaults() -> FleetKeys {
        FleetKeys {
            url: None,
            groups: Vec::new(),
            trusted_keys_file: None,
            probation: "60s".into(),
            state_interval: "5m".into(),
            client_id: None,
            version: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            username: None,
            password_file: None,
        }
    }

    #[test]
    fn the_fleet_is_off_without_a_url_and_needs_trusted_keys_with_one() {
        assert!(defaults().build("gw", 1).unwrap().is_none());
        let keys = FleetKeys {
            url: Some("mqtt://127.0.0.1:1".into()),
            ..defaults()
        };
        assert_eq!(keys.build("gw", 1).unwrap_err().key, "trusted_keys_file");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "ops-1 not base64\n").unwrap();
        let keys = FleetKeys {
            trusted_keys_file: Some(file.clone()),
            ..keys
        };
        let e = keys.build("gw", 1).unwrap_err();
        assert_eq!(e.key, "trusted_keys_file");
        assert!(e.message.contains("line 1"), "{}", e.message);
        let (_, public) = super::super::verify::SigningKey::generate("ops-1").unwrap();
        std::fs::write(&file, public).unwrap();
        let cfg = FleetKeys {
            groups: vec!["north".into()],
            ..keys.clone()
        }
        .build("gw", 1)
        .unwrap()
        .unwrap();
        assert_eq!(cfg.state_interval, Duration::from_secs(300));
        assert_eq!(cfg.probation, Duration::from_secs(60));
        assert_eq!(
            cfg.filters(),
            ["fleet/gw/control/+", "fleet/group/north/control/+"]
        );
        let bad_url = FleetKeys {
            url: Some("http://x".into()),
            ..keys.clone()
        };
        assert_eq!(bad_url.build("gw", 1).unwrap_err().key, "url");
        let bad_group = FleetKeys {
            groups: vec!["a/b".into()],
            ..keys
        };
        assert_eq!(bad_group.build("gw", 1).unwrap_err().key, "groups");
    }
}
