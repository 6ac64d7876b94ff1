//! Device credentials: the tokens file and protected mode (DESIGN §5).
//!
//! The tokens file holds one `device_id:sha256-hex-of-token` per line, so the
//! gateway never stores a usable token. Without a tokens file the gateway is
//! in protected mode: it accepts unauthenticated ingest, and start-up refuses
//! any address but loopback.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Errors reading the tokens file. Never includes token material.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file cannot be read.
    #[error("cannot read device tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("device tokens file {path}, line {line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// How ingest requests are authenticated.
#[derive(Debug, Clone)]
pub enum DeviceAuth {
    /// No credentials configured: loopback-only, unauthenticated.
    Protected,
    /// Bearer tokens, by SHA-256 of the token.
    Tokens(HashMap<[u8; 32], String>),
}

/// The outcome of checking a request's credentials for a device.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthDecision {
    /// Allowed.
    Allow,
    /// No or unknown credentials (401).
    Unauthenticated(&'static str),
    /// Valid credentials of another device (403).
    Forbidden,
}

/// SHA-256 of `token`.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl DeviceAuth {
    /// Loads a tokens file.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut map = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: &str| TokensError::Line {
                path: shown.clone(),
                line: i + 1,
                message: message.into(),
            };
            let (device, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected device_id:sha256-hex"))?;
            if !gateway_actors::ingest::validate::is_valid_device_id(device) {
                return Err(err(
                    "device id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                ));
            }
            let mut h = [0u8; 32];
            hex::decode_to_slice(hash.trim(), &mut h)
                .map_err(|_| err("hash must be 64 hex characters (sha256)"))?;
            map.insert(h, device.to_string());
        }
        Ok(DeviceAuth::Tokens(map))
    }

    /// Checks the `Authorization` header value for `device_id`.
    pub fn check(&self, authorization: Option<&str>, device_id: &str) -> AuthDecision {
        let map = match self {
            DeviceAuth::Protected => return AuthDecision::Allow,
            DeviceAuth::Tokens(m) => m,
        };
        let Some(value) = authorization else {
            return AuthDecision::Unauthenticated("missing Authorization: Bearer <device token>");
        };
        let Some(token) = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return AuthDecision::Unauthenticated(
                "Authorization must be \"Bearer <device token>\"",
            );
        };
        // The map is keyed by a hash: lookup time does not depend on how much
        // of a guessed token is right.
        match map.get(&hash_token(token)) {
            None => AuthDecision::Unauthenticated("unknown device token"),
            Some(owner) if owner == device_id => AuthDecision::Allow,
            Some(_) => AuthDecision::Forbidden,
        }
    }
}

impl DeviceAuth {
    /// True when `token` is some device's token.
    pub fn is_device_token(&self, token: &str) -> bool {
        match self {
            DeviceAuth::Protected => false,
            DeviceAuth::Tokens(m) => m.contains_key(&hash_token(token)),
        }
    }
}

/// Who may use the admin API: the holder of the admin token, or (with
/// HTTPS client authentication) a client certificate with the admin CN.
#[derive(Debug, Clone)]
pub struct AdminAuth {
    token_hash: [u8; 32],
    cert_cn: Option<String>,
}

/// The outcome of an admin credentials check.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminDecision {
    /// Allowed; names the credential for the audit log.
    Allow(String),
    /// No or unknown credentials (401).
    Unauthenticated(&'static str),
    /// Valid credentials that are not admin ones (403).
    Forbidden(String),
}

/// Where the admin token lives: `http.admin_token_file`, or
/// `{data_dir}/admin.token`.
pub fn admin_token_path(settings: &crate::config::Settings) -> std::path::PathBuf {
    settings
        .http
        .admin_token_file
        .clone()
        .unwrap_or_else(|| settings.data_dir.join("admin.token"))
}

/// Reads the admin token; with no `http.admin_token_file` configured, a
/// random one is created at `{data_dir}/admin.token` (mode 0600) on first
/// start, so the admin API is never open and the CLI finds the token.
pub fn load_admin_token(
    settings: &crate::config::Settings,
) -> anyhow::Result<gateway_actors::Secret> {
    use anyhow::Context as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = admin_token_path(settings);
    if settings.http.admin_token_file.is_none() && !path.exists() {
        gateway_actors::durable::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating the admin token file {}", path.display()))?;
        writeln!(f, "{}", hex::encode(raw))?;
        f.sync_all()?;
        gateway_actors::durable::sync_parent(&path)?;
        tracing::info!(path = %path.display(), "created an admin token for the admin API and the CLI");
    }
    let token = gateway_actors::secret::read_secret_file(&path)
        .map_err(|e| anyhow::anyhow!("the admin token file {}: {e}", path.display()))?;
    if token.expose().trim().len() < 16 {
        anyhow::bail!(
            "the admin token in {} is shorter than 16 characters",
            path.display()
        );
    }
    Ok(token)
}

impl AdminAuth {
    /// Admin credentials: the token, and the admin certificate CN when
    /// client certificates are verified.
    pub fn new(token: &str, cert_cn: Option<String>) -> Self {
        Self {
            token_hash: hash_token(token),
            cert_cn,
        }
    }

    /// Checks a request's `Authorization` header and verified client
    /// certificate CN.
    pub fn check(
        &self,
        authorization: Option<&str>,
        peer_cn: Option<&str>,
        devices: &DeviceAuth,
    ) -> AdminDecision {
        if let (Some(want), Some(cn)) = (&self.cert_cn, peer_cn) {
            if want == cn {
                return AdminDecision::Allow(format!("cert:{cn}"));
            }
        }
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match token {
            Some(t) if hash_token(t) == self.token_hash => AdminDecision::Allow("token".into()),
            Some(t) if devices.is_device_token(t) => AdminDecision::Forbidden(
                "a device token cannot use the admin API; use the admin token".into(),
            ),
            Some(_) => AdminDecision::Unauthenticated("unknown admin token"),
            None => match peer_cn {
                Some(cn) if self.cert_cn.is_some() => AdminDecision::Forbidden(format!(
                    "client certificate CN={cn} is not the admin certificate"
                )),
                _ => AdminDecision::Unauthenticated(
                    "missing Authorization: Bearer <admin token> (see http.admin_token_file)",
                ),
            },
        }
    }
}

/// A fresh random token and its tokens-file line for `device_id`.
pub fn new_token(device_id: &str) -> Result<(String, String), getrandom::Error> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)?;
    let token = hex::encode(raw);
    let line = format!("{device_id}:{}", hex::encode(hash_token(&token)));
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_allow_their_device_and_forbid_others() {
        let (token, line) = new_token("dev-1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, format!("# comment\n\n{line}\n")).unwrap();
        let auth = DeviceAuth::load(&f).unwrap();
        let bearer = format!("Bearer {token}");
        assert_eq!(auth.check(Some(&bearer), "dev-1"), AuthDecision::Allow);
        assert_eq!(auth.check(Some(&bearer), "dev-2"), AuthDecision::Forbidden);
        assert!(matches!(
            auth.check(None, "dev-1"),
            AuthDecision::Unauthenticated(_)
        ));
        assert!(matches!(
            auth.check(Some("Bearer nope"), "dev-1"),
            AuthDecision::Unauthenticated(_)
        ));
        assert!(matches!(
            auth.check(Some(&token), "dev-1"),
            AuthDecision::Unauthenticated(_)
        ));
    }

    #[test]
    fn admin_needs_the_admin_token_or_certificate_and_refuses_device_tokens() {
        let (token, line) = new_token("dev-1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, format!("{line}\n")).unwrap();
        let devices = DeviceAuth::load(&f).unwrap();
        let admin = AdminAuth::new("the-admin-token-0123456789", Some("gateway-admin".into()));
        let check = |a: Option<&str>, cn: Option<&str>| admin.check(a, cn, &devices);
        assert_eq!(
            check(Some("Bearer the-admin-token-0123456789"), None),
            AdminDecision::Allow("token".into())
        );
        assert_eq!(
            check(None, Some("gateway-admin")),
            AdminDecision::Allow("cert:gateway-admin".into())
        );
        assert!(matches!(
            check(Some(&format!("Bearer {token}")), None),
            AdminDecision::Forbidden(_)
        ));
        assert!(matches!(
            check(None, Some("dev-1")),
            AdminDecision::Forbidden(_)
        ));
        assert!(matches!(
            check(None, None),
            AdminDecision::Unauthenticated(_)
        ));
        assert!(matches!(
            check(Some("Bearer nope"), None),
            AdminDecision::Unauthenticated(_)
        ));
    }

    #[test]
    fn a_malformed_line_is_reported_by_number_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "dev-1:abc-secret-looking\n").unwrap();
        let err = DeviceAuth::load(&f).unwrap_err().to_string();
        assert!(err.contains("line 1") && !err.contains("secret"), "{err}");
    }
}
