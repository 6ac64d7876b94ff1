//! The `[otlp]` section: where traces go ([`OtlpKeys`] builds the endpoint).

use gateway_actors::keys::KeyError;
use serde::Deserialize;

/// The `[otlp]` keys, as merged from every layer (defaults included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpKeys {
    /// An OTLP/HTTP base URL (`http://collector:4318`; the exporter appends
    /// `/v1/traces`). Unset or empty: no traces, unless the standard
    /// `OTEL_EXPORTER_OTLP_*` variables say where.
    pub endpoint: Option<String>,
}

impl OtlpKeys {
    /// The endpoint without a trailing `/`, or `None` (traces off).
    pub fn build(&self) -> Result<Option<String>, KeyError> {
        match self.endpoint.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(e) if e.starts_with("http://") || e.starts_with("https://") => {
                Ok(Some(e.trim_end_matches('/').to_string()))
            }
            Some(e) => Err(KeyError::new(
                "endpoint",
                format!(
                    "{e:?} must be an http:// or https:// base URL (the exporter appends /v1/traces)"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    #[test]
    fn otlp_endpoint_is_off_by_default_and_must_be_an_http_base_url() {
        assert_eq!(Settings::from_toml("").unwrap().otlp_endpoint, None);
        let s = Settings::from_toml("[otlp]\nendpoint = \"https://otel.example:4318/\"\n").unwrap();
        assert_eq!(
            s.otlp_endpoint.as_deref(),
            Some("https://otel.example:4318")
        );
        let e = Settings::from_toml("[otlp]\nendpoint = \"otel.example:4317\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("otlp.endpoint"), "{e}");
    }
}
