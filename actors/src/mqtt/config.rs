//! Settings of the MQTT ingest connection.

use super::topics::Topics;
use std::time::Duration;

use std::path::{Path, PathBuf};

use super::client::{Backoff, ClientOptions, Connection};
use crate::ingest::PayloadFormat;
use crate::keys::{file_key, KeyError};

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

/// TLS material, already read from files (PEM), and the files it came
/// from (read again by [`MqttTls::reread`] to rotate certificates).
#[derive(Clone)]
pub struct MqttTls {
    /// CA certificate(s) the broker's certificate must chain to; `None` = system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and PKCS#8 key for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// The files: CA, client certificate, client key.
    pub files: TlsFiles,
}

/// Where a connection's TLS material lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `ca_file`.
    pub ca: Option<PathBuf>,
    /// `client_cert_file`.
    pub cert: Option<PathBuf>,
    /// `client_key_file`.
    pub key: Option<PathBuf>,
}

impl MqttTls {
    /// The same files read again, checked by building a TLS connector from
    /// them: a set that does not load is refused (the error names the key
    /// and the file) and the caller keeps what it has.
    pub fn reread(&self) -> Result<MqttTls, String> {
        let f = &self.files;
        let tls = broker_tls(
            "mqtts",
            f.ca.as_deref(),
            f.cert.as_deref(),
            f.key.as_deref(),
        )
        .map_err(|e| format!("{}: {}", e.key, e.message))?
        .ok_or_else(|| "no TLS files".to_string())?;
        super::tls::tls_connector(&tls)?;
        Ok(tls)
    }
}

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

/// Everything `MqttIngest` needs to connect and subscribe.
#[derive(Debug, Clone)]
pub struct MqttIngestConfig {
    /// The broker connection (shared with the control plane, whose client
    /// id gets a `-control` suffix).
    pub conn: Connection,
    /// Topic templates: what to subscribe, and how a topic gives the device
    /// id and tags.
    pub topics: Topics,
    /// JSON, Protobuf or detect.
    pub payload_format: PayloadFormat,
    /// Messages the broker may send before we ack (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// How long the broker keeps our session while we are away (MQTT 5).
    pub session_expiry: Duration,
    /// Run the control plane (`gateway/{id}/control/+`) on this broker.
    pub control: bool,
}

impl MqttIngestConfig {
    /// Defaults for a broker at `host:port`: MQTT 5, incoming packets up
    /// to 256 KiB, reconnects from 200 ms to 30 s.
    pub fn new(host: &str, port: u16, client_id: &str) -> Self {
        let mut conn = Connection::new(host, port, client_id);
        conn.version = MqttVersion::V5;
        conn.max_packet_bytes = 256 * 1024;
        conn.reconnect = Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
        };
        Self {
            conn,
            topics: Topics::default(),
            payload_format: PayloadFormat::Auto,
            receive_maximum: 1000,
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            control: true,
        }
    }

    /// The ingest connection's options: a persistent session, manual acks,
    /// our Receive Maximum, the telemetry subscription.
    pub fn client_options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(self.conn.clone());
        o.persistent = true;
        o.session_expiry = self.session_expiry;
        o.manual_acks = true;
        o.receive_maximum = Some(self.receive_maximum);
        o.request_capacity = usize::from(self.receive_maximum) * 2 + 16;
        o.subscribe = self.topics.filters();
        o
    }
}

/// `host[:port]` of an `mqtt://` or `mqtts://` URL (default ports 1883 and
/// 8883): the scheme, host and port, or what is wrong with it.
pub fn broker_address(url: &str) -> Result<(&'static str, String, u16), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("mqtt", rest)) => ("mqtt", rest),
        Some(("mqtts", rest)) => ("mqtts", rest),
        _ => {
            return Err(format!(
                "{url:?}: expected mqtt://host:port or mqtts://host:port"
            ))
        }
    };
    let hostport = rest.trim_end_matches('/');
    let default_port = if scheme == "mqtts" { 8883 } else { 1883 };
    let (h, p) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let p: u16 = p.parse().map_err(|_| format!("{url:?}: bad port"))?;
            (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p,
            )
        }
        _ => (hostport.to_string(), default_port),
    };
    if h.is_empty() {
        return Err(format!("{url:?}: host is missing"));
    }
    Ok((scheme, h, p))
}

/// The TLS files of a broker connection (ingest or sink), read: TLS only
/// for `mqtts`; a client certificate needs its key and the other way round.
pub fn broker_tls(
    scheme: &str,
    ca_file: Option<&Path>,
    client_cert_file: Option<&Path>,
    client_key_file: Option<&Path>,
) -> Result<Option<MqttTls>, KeyError> {
    let any = ca_file.is_some() || client_cert_file.is_some() || client_key_file.is_some();
    if scheme != "mqtts" {
        if any {
            return Err(KeyError::new(
                "url",
                "TLS files are set: use an mqtts:// URL",
            ));
        }
        return Ok(None);
    }
    let ca_pem = ca_file.map(|p| file_key("ca_file", p)).transpose()?;
    let client = match (client_cert_file, client_key_file) {
        (Some(c), Some(k)) => Some((
            file_key("client_cert_file", c)?,
            file_key("client_key_file", k)?,
        )),
        (None, None) => None,
        (Some(_), None) => {
            return Err(KeyError::new(
                "client_cert_file",
                "client_key_file must be set too",
            ))
        }
        (None, Some(_)) => {
            return Err(KeyError::new(
                "client_key_file",
                "client_cert_file must be set too",
            ))
        }
    };
    Ok(Some(MqttTls {
        ca_pem,
        client,
        files: TlsFiles {
            ca: ca_file.map(Path::to_path_buf),
            cert: client_cert_file.map(Path::to_path_buf),
            key: client_key_file.map(Path::to_path_buf),
        },
    }))
}
