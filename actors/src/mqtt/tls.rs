//! TLS for MQTT connections (ingest and the upstream sink): OpenSSL through
//! native-tls, one TLS stack with the rest of the gateway.

use super::config::MqttTls;

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
