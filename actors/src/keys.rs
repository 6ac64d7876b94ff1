//! Configuration keys owned by the code that uses them: the error a
//! section's validation returns. The `gateway` crate's layered loader turns
//! it into the error that names the full key (`sinks.NAME.url`) and the
//! layer (file, environment, flag) that set it.

use std::path::Path;

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
