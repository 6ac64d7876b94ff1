//! Secrets: one type that never shows its value, and one way to read it
//! from a file.
//!
//! Every password, token and key the gateway reads from a `*_file` setting
//! is a [`Secret`]: `Debug`, `Display` and serialization print
//! `<redacted>`, so a secret cannot reach a log line, `config print` or a
//! panic message by accident. Code that must hand the value to a client
//! library calls [`Secret::expose`], which is easy to find in review.

use std::fmt;
use std::path::Path;

/// A secret value (password, token, key). Redacted everywhere it could be
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the client library that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Reads a secret from `path`: UTF-8 text, without the trailing line
/// ending an editor or `echo` adds (other whitespace is part of the
/// secret). The error names the file, never the content.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8(raw).map_err(|_| "must be UTF-8 text".to_string())?;
    Ok(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_secret_file_loses_its_line_ending_and_errors_name_the_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cr3t \r\n").unwrap();
        assert_eq!(read_secret_file(&p).unwrap().expose(), "s3cr3t ");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert_eq!(read_secret_file(&p).unwrap_err(), "must be UTF-8 text");
        let missing = dir.path().join("missing");
        assert!(read_secret_file(&missing).unwrap_err().contains("missing"));
    }
}
