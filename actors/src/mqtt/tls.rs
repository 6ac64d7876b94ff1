//! TLS for MQTT connections (ingest and the upstream sink): OpenSSL through
//! native-tls, one TLS stack with the rest of the gateway.

use std::path::{Path, PathBuf};

use crate::keys::{file_key, KeyError};

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
        tls_connector(&tls)?;
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

/// A connector trusting `tls.ca_pem` (or the system roots) and presenting
/// `tls.client` for mutual TLS.
pub fn tls_connector(tls: &MqttTls) -> Result<native_tls::TlsConnector, String> {
    let mut b = native_tls::TlsConnector::builder();
    if let Some(ca) = &tls.ca_pem {
        for cert in pem_blocks(ca, "CERTIFICATE") {
            let c = native_tls::Certificate::from_pem(&cert)
                .map_err(|e| format!("mqtt CA certificate: {e}"))?;
            b.add_root_certificate(c);
        }
    }
    if let Some((cert, key)) = &tls.client {
        let id = native_tls::Identity::from_pkcs8(cert, key).map_err(|e| {
            format!("mqtt client certificate/key (the key must be PKCS#8 PEM): {e}")
        })?;
        b.identity(id);
    }
    b.build().map_err(|e| format!("mqtt TLS: {e}"))
}

/// Splits a PEM bundle into its `label` blocks.
pub fn pem_blocks(pem: &[u8], label: &str) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(i) = rest.find(&begin) {
        let Some(j) = rest[i..].find(&end) else { break };
        out.push(rest.as_bytes()[i..i + j + end.len()].to_vec());
        rest = &rest[i + j + end.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_bundles_are_split_into_certificates() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\nx\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_blocks(pem, "CERTIFICATE").len(), 2);
    }
}
