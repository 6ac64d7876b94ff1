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
    fn a_malformed_line_is_reported_by_number_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "dev-1:abc-secret-looking\n").unwrap();
        let err = DeviceAuth::load(&f).unwrap_err().to_string();
        assert!(err.contains("line 1") && !err.contains("secret"), "{err}");
    }
}
