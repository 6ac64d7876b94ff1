//! The `[http]` section: the listener's keys ([`HttpKeys`]) and what they
//! build ([`HttpSettings`]). Defaults: `config/default.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gateway_actors::keys::{duration_key, socket_addr_key, KeyError};
use serde::Deserialize;

/// The `[http]` keys, as merged from every layer (defaults included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpKeys {
    /// Listen address, `host:port` (port 0 picks a free port); a
    /// non-loopback address requires device credentials.
    pub addr: String,
    /// HTTP worker threads; 0 = one per CPU core.
    pub workers: usize,
    /// Headers and body must arrive (and be answered) within this, at least
    /// 1s: else 408 and the connection is closed.
    pub request_timeout: String,
    /// Open connections at most, at least 1; more wait in the listen backlog.
    pub max_connections: usize,
    /// Device tokens, lines `device_id:sha256-hex-of-token` (none:
    /// protected mode).
    pub device_tokens_file: Option<PathBuf>,
    /// The admin API's bearer token (none: `{data_dir}/admin.token`,
    /// created on first start).
    pub admin_token_file: Option<PathBuf>,
    /// With `client_ca_file`: a client certificate with this CN may use the
    /// admin API.
    pub admin_cert_cn: String,
    /// PEM certificate chain; with `tls_key_file`: HTTPS.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Require client certificates that chain to this CA (mTLS; needs HTTPS).
    pub client_ca_file: Option<PathBuf>,
}

/// HTTP server settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Listen address (port 0 picks a free port).
    pub addr: SocketAddr,
    /// Worker threads (0 = one per core).
    pub workers: usize,
    /// A request (headers and body) must arrive within this; else 408.
    pub request_timeout: Duration,
    /// Open connections the listener keeps at most (more wait in the backlog).
    pub max_connections: usize,
    /// Device tokens file (`device_id:sha256hex` lines).
    pub device_tokens_file: Option<PathBuf>,
    /// Admin token file.
    pub admin_token_file: Option<PathBuf>,
    /// Common name of the client certificate that may use the admin API
    /// (when HTTPS client authentication is on).
    pub admin_cert_cn: String,
    /// HTTPS.
    pub tls: Option<TlsSettings>,
}

/// HTTPS settings.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// CA that client certificates must chain to (mTLS) when set.
    pub client_ca_file: Option<PathBuf>,
}

impl HttpKeys {
    /// Validates the keys (the token files must be readable files now).
    pub fn build(&self) -> Result<HttpSettings, KeyError> {
        let addr = socket_addr_key("addr", &self.addr)?;
        let tls =
            match (&self.tls_cert_file, &self.tls_key_file) {
                (Some(c), Some(k)) => Some(TlsSettings {
                    cert_file: c.clone(),
                    key_file: k.clone(),
                    client_ca_file: self.client_ca_file.clone(),
                }),
                (None, None) if self.client_ca_file.is_some() => return Err(KeyError::new(
                    "client_ca_file",
                    "client certificates need HTTPS: set http.tls_cert_file and http.tls_key_file",
                )),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(KeyError::new(
                        "tls_cert_file",
                        "http.tls_key_file must be set too",
                    ))
                }
                (None, Some(_)) => {
                    return Err(KeyError::new(
                        "tls_key_file",
                        "http.tls_cert_file must be set too",
                    ))
                }
            };
        for (key, p) in [
            ("device_tokens_file", &self.device_tokens_file),
            ("admin_token_file", &self.admin_token_file),
        ] {
            if let Some(p) = p.as_ref().filter(|p| !p.is_file()) {
                return Err(KeyError::new(
                    key,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        let request_timeout = duration_key("request_timeout", &self.request_timeout)?;
        if request_timeout < Duration::from_secs(1) {
            return Err(KeyError::new("request_timeout", "must be at least 1s"));
        }
        if self.max_connections == 0 {
            return Err(KeyError::new("max_connections", "must be at least 1"));
        }
        Ok(HttpSettings {
            addr,
            workers: self.workers,
            request_timeout,
            max_connections: self.max_connections,
            device_tokens_file: self.device_tokens_file.clone(),
            admin_token_file: self.admin_token_file.clone(),
            admin_cert_cn: self.admin_cert_cn.clone(),
            tls,
        })
    }
}
