//! Configuration keys owned by the code that uses them: the error a
//! section's validation returns. The `gateway` crate's layered loader turns
//! it into the error that names the full key (`sinks.NAME.url`) and the
//! layer (file, environment, flag) that set it. The helpers below read the
//! kinds of value many sections share (durations, addresses, secret files)
//! with one wording of what is wrong.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::secret::{read_secret_file, Secret};

/// One key of a section is wrong: the key relative to the section
/// (`url`, `password_file`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// The key, relative to its section.
    pub key: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl KeyError {
    /// `key` is wrong because of `message`.
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// The secret in the file that `key` names, if it names one.
pub fn secret_key(key: &str, path: Option<&Path>) -> Result<Option<Secret>, KeyError> {
    path.map(|p| read_secret_file(p).map_err(|e| KeyError::new(key, e)))
        .transpose()
}

/// The bytes of the file that `key` names (certificates, keys).
pub fn file_key(key: &str, path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path)
        .map_err(|e| KeyError::new(key, format!("cannot read {}: {e}", path.display())))
}

/// The duration that `key` holds, written like `"24h"`, `"90s"` or `"30ms"`.
pub fn duration_key(key: &str, text: &str) -> Result<Duration, KeyError> {
    humantime::parse_duration(text).map_err(|e| {
        KeyError::new(
            key,
            format!("{text:?} is not a duration like \"24h\" or \"90s\" ({e})"),
        )
    })
}

/// Like [`duration_key`], no longer than `max` (`why` says what a longer
/// one would cost).
pub fn duration_at_most(
    key: &str,
    text: &str,
    max: Duration,
    why: &str,
) -> Result<Duration, KeyError> {
    let d = duration_key(key, text)?;
    if d > max {
        return Err(KeyError::new(
            key,
            format!("at most {} ({why})", humantime::format_duration(max)),
        ));
    }
    Ok(d)
}

/// The socket address that `key` holds (`host:port`; port 0 picks a free one).
pub fn socket_addr_key(key: &str, text: &str) -> Result<SocketAddr, KeyError> {
    text.parse()
        .map_err(|e| KeyError::new(key, format!("{text:?} is not host:port ({e})")))
}
