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

/// Query or header words whose value is a credential.
const SECRET_WORDS: [&str; 8] = [
    "token",
    "password",
    "passwd",
    "secret",
    "signature",
    "credential",
    "api_key",
    "apikey",
];

/// `text` (an error message) without credentials, at most `max` characters:
/// the user info of URLs (`scheme://user:pass@host` becomes
/// `scheme://<redacted>@host`), the word after `Bearer`/`Basic`, and the
/// value after a credential word followed by `=` or `:` (`token=…`,
/// `X-Amz-Signature=…`, `password: …`). Error texts travel further than
/// logs (the admin API, the fleet state in the cloud), so they are cleaned
/// where they are recorded.
pub fn redact(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let words: Vec<&str> = text.split_inclusive(char::is_whitespace).collect();
    let mut hide_next = false;
    for w in words {
        let (word, space) = w.split_at(w.trim_end().len());
        if hide_next && !word.is_empty() {
            out.push_str("<redacted>");
            out.push_str(space);
            hide_next = false;
            continue;
        }
        let lower = word.to_ascii_lowercase();
        let names_secret = lower
            .strip_suffix([':', '='])
            .is_some_and(|k| SECRET_WORDS.iter().any(|s| k.ends_with(s)));
        hide_next = lower == "bearer" || lower == "basic" || names_secret;
        out.push_str(&redact_word(word));
        out.push_str(space);
    }
    if out.chars().count() > max {
        out = out.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
    }
    out
}

/// One whitespace-free word: URL user info and `word=value` credentials.
fn redact_word(word: &str) -> String {
    let mut w = word.to_string();
    if let Some(scheme_end) = w.find("://") {
        let rest = &w[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            w = format!("{}<redacted>{}", &w[..scheme_end + 3], &rest[at..]);
        }
    }
    let lower = w.to_ascii_lowercase();
    let mut out = String::new();
    let mut last = 0;
    for (i, _) in lower.match_indices(['=', ':']) {
        if i < last || i + 1 >= w.len() {
            continue;
        }
        let key_start = lower[..i]
            .rfind(['?', '&', ';', ',', '"', '\'', '('])
            .map_or(0, |p| p + 1);
        if SECRET_WORDS
            .iter()
            .any(|s| lower[key_start..i].ends_with(s))
        {
            let end = w[i + 1..]
                .find(['&', ';', ',', '"', '\'', ')'])
                .map_or(w.len(), |e| i + 1 + e);
            out.push_str(&w[last..=i]);
            out.push_str("<redacted>");
            last = end;
        }
    }
    out.push_str(&w[last..]);
    out
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

    #[test]
    fn redacted_errors_keep_no_url_credentials_tokens_or_signatures() {
        let e =
            "publish to https://user:hunter2@s3.example.com/b?X-Amz-Signature=abc123&x=1 failed: \
                 Authorization: Bearer tok3n, token=s3cr3t password: pw";
        let r = redact(e, 1000);
        for secret in ["hunter2", "abc123", "tok3n", "s3cr3t", "user:"] {
            assert!(!r.contains(secret), "{secret} in {r}");
        }
        assert!(r.contains("https://<redacted>@s3.example.com/b?"), "{r}");
        assert!(r.contains("x=1"), "{r}");
        assert_eq!(redact("connection refused", 1000), "connection refused");
        assert_eq!(redact("abcdef", 4).chars().count(), 4);
    }
}
