//! Signed fleet commands: the envelope, its canonical form, and Ed25519
//! (ring's) signing and verification.
//!
//! The envelope is one JSON object:
//!
//! ```json
//! {"request_id":"r-1","issued_at":1733550000000,"key_id":"ops-1",
//!  "target":"gw-7","command":"sink.pause","args":{"sink":"archive"},
//!  "signature":"BASE64"}
//! ```
//!
//! - `issued_at`: epoch milliseconds; accepted within ±[`WINDOW`] of the
//!   gateway's clock.
//! - `target`: the gateway id, or `group/NAME`: a command signed for one
//!   gateway (or group) is refused by every other, so a broker account
//!   cannot re-aim it.
//! - `command` and `args`: a local control-plane command (DESIGN §I6) and
//!   its arguments; the topic's last level must name the same command.
//! - `signature`: Ed25519 over the canonical JSON ([`canonical`]) of the
//!   object without `signature`, standard base64.
//!
//! Canonical JSON: object keys sorted by their UTF-8 bytes at every depth,
//! no whitespace, strings and numbers as serde_json writes them. It is
//! written by [`canonical`] itself, not by serde_json's map order, so it
//! stays canonical whatever map features the dependency tree turns on.
//!
//! Keys are files of one line `KEY_ID BASE64`: a trusted public key
//! (raw 32 bytes) per line in `trusted_keys_file` (blank lines and `#`
//! comments allowed); a private key (PKCS#8 v2 from ring) in the operator's
//! key file, mode 0600.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde_json::{json, Map, Value};

/// How far `issued_at` may be from the gateway's clock, either way.
pub const WINDOW: Duration = Duration::from_secs(5 * 60);

/// Why a fleet command was refused (the reply's `error` and the metric's
/// `result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `signature` or no `key_id`.
    Unsigned,
    /// The signature does not verify (the message was changed, or signed
    /// with another key).
    BadSignature,
    /// `issued_at` is more than [`WINDOW`] in the past or the future.
    Expired,
    /// This `request_id` was already accepted within the window.
    Replayed,
    /// `key_id` is not in `trusted_keys_file`.
    UnknownKey,
    /// Signed for another gateway or group, or sent on another command's topic.
    WrongTarget,
    /// Not a JSON object, or a field is missing or of the wrong type.
    BadRequest,
}

impl Refusal {
    /// The reason as the reply and the metric name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::Replayed => "replayed",
            Refusal::UnknownKey => "unknown_key",
            Refusal::WrongTarget => "wrong_target",
            Refusal::BadRequest => "bad_request",
        }
    }

    /// Every reason (metric series are created up front).
    pub const ALL: [Refusal; 7] = [
        Refusal::Unsigned,
        Refusal::BadSignature,
        Refusal::Expired,
        Refusal::Replayed,
        Refusal::UnknownKey,
        Refusal::WrongTarget,
        Refusal::BadRequest,
    ];
}

/// A refused envelope: the request id when it had a usable one, the reason
/// and a sentence for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `request_id`, when present.
    pub request_id: Option<String>,
    /// Why.
    pub reason: Refusal,
    /// For a person.
    pub message: String,
}

/// An envelope whose signature verified and whose `issued_at` is in the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Unique per command.
    pub request_id: String,
    /// Epoch ms.
    pub issued_at: i64,
    /// The signer's key id.
    pub key_id: String,
    /// The gateway id or `group/NAME`.
    pub target: String,
    /// The command's name.
    pub command: String,
    /// Its arguments (an object, or null).
    pub args: Value,
}

/// `v` as canonical JSON (see the module doc).
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A key id: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The public keys commands may be signed with, by key id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys(BTreeMap<String, Vec<u8>>);

impl TrustedKeys {
    /// Parses `KEY_ID BASE64PUBKEY` lines; the error names the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why} (expected \"KEY_ID BASE64\")", n + 1);
            let mut parts = line.split_whitespace();
            let (Some(id), Some(b64), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("not two fields"));
            };
            if !valid_key_id(id) {
                return Err(bad("the key id must be 1 to 64 of A-Z a-z 0-9 _ . -"));
            }
            let key = B64.decode(b64).map_err(|_| bad("the key is not base64"))?;
            if key.len() != 32 {
                return Err(bad("an Ed25519 public key is 32 bytes"));
            }
            if keys.insert(id.to_string(), key).is_some() {
                return Err(bad(&format!("key id {id:?} appears twice")));
            }
        }
        if keys.is_empty() {
            return Err("no key in it: a fleet needs at least one trusted key".into());
        }
        Ok(Self(keys))
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No keys (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An operator's private key.
pub struct SigningKey {
    key_id: String,
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// A fresh key: its private key file's text (`KEY_ID BASE64PKCS8`) and
    /// its public key line for `trusted_keys_file`.
    pub fn generate(key_id: &str) -> Result<(String, String), String> {
        if !valid_key_id(key_id) {
            return Err(format!("key id {key_id:?}: 1 to 64 of A-Z a-z 0-9 _ . -"));
        }
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "no randomness available".to_string())?;
        let key = Self::from_pkcs8(key_id, doc.as_ref())?;
        Ok((
            format!("{key_id} {}\n", B64.encode(doc.as_ref())),
            key.public_line(),
        ))
    }

    fn from_pkcs8(key_id: &str, pkcs8: &[u8]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        Ok(Self {
            key_id: key_id.to_string(),
            pair,
        })
    }

    /// Reads a private key file (`KEY_ID BASE64PKCS8`).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut parts = text.split_whitespace();
        let (Some(id), Some(b64), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "{}: expected one line \"KEY_ID BASE64\" (from `gateway fleet keygen`)",
                path.display()
            ));
        };
        let pkcs8 = B64
            .decode(b64)
            .map_err(|_| format!("{}: the key is not base64", path.display()))?;
        Self::from_pkcs8(id, &pkcs8).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Its id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `KEY_ID BASE64PUBKEY`: its line in `trusted_keys_file`.
    pub fn public_line(&self) -> String {
        format!(
            "{} {}",
            self.key_id,
            B64.encode(self.pair.public_key().as_ref())
        )
    }

    /// A signed envelope of `command` with `args` for `target`.
    pub fn sign(
        &self,
        target: &str,
        command: &str,
        args: Value,
        request_id: &str,
        issued_at: i64,
    ) -> Value {
        let mut v = json!({
            "request_id": request_id,
            "issued_at": issued_at,
            "key_id": self.key_id,
            "target": target,
            "command": command,
            "args": args,
        });
        let sig = self.pair.sign(canonical(&v).as_bytes());
        v["signature"] = Value::String(B64.encode(sig.as_ref()));
        v
    }
}

/// Checks an envelope: well formed, signed by a trusted key, signature
/// valid over its canonical form, `issued_at` within the window of
/// `now_ms`. (Whether its request id is new is [`super::seen`]'s question;
/// whether it is aimed at this gateway, the client's.)
pub fn check(payload: &[u8], keys: &TrustedKeys, now_ms: i64) -> Result<Envelope, Refused> {
    let refuse = |request_id: Option<String>, reason, message: String| Refused {
        request_id,
        reason,
        message,
    };
    let mut m: Map<String, Value> = serde_json::from_slice(payload).map_err(|e| {
        refuse(
            None,
            Refusal::BadRequest,
            format!("the payload must be a JSON object: {e}"),
        )
    })?;
    let request_id = m
        .get("request_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let rid = || request_id.clone();
    let signature = match m.remove("signature") {
        Some(Value::String(s)) => s,
        _ => return Err(refuse(rid(), Refusal::Unsigned, "no \"signature\"".into())),
    };
    let Some(key_id) = m.get("key_id").and_then(Value::as_str).map(str::to_string) else {
        return Err(refuse(rid(), Refusal::Unsigned, "no \"key_id\"".into()));
    };
    let Some(key) = keys.0.get(&key_id) else {
        return Err(refuse(
            rid(),
            Refusal::UnknownKey,
            format!("key id {key_id:?} is not in trusted_keys_file"),
        ));
    };
    let sig = B64.decode(&signature).map_err(|_| {
        refuse(
            rid(),
            Refusal::BadSignature,
            "the signature is not base64".into(),
        )
    })?;
    let message = canonical(&Value::Object(m.clone()));
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message.as_bytes(), &sig)
        .map_err(|_| {
            refuse(
                rid(),
                Refusal::BadSignature,
                format!("the signature does not verify with key {key_id:?}"),
            )
        })?;
    let field = |name: &str| {
        m.get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                refuse(
                    rid(),
                    Refusal::BadRequest,
                    format!("\"{name}\" must be a string"),
                )
            })
    };
    let (request_id_s, target, command) =
        (field("request_id")?, field("target")?, field("command")?);
    let Some(issued_at) = m.get("issued_at").and_then(Value::as_i64) else {
        return Err(refuse(
            rid(),
            Refusal::BadRequest,
            "\"issued_at\" must be epoch milliseconds".into(),
        ));
    };
    let skew = now_ms.saturating_sub(issued_at);
    if skew.unsigned_abs() > WINDOW.as_millis() as u64 {
        let when = if skew > 0 { "old" } else { "in the future" };
        return Err(refuse(
            rid(),
            Refusal::Expired,
            format!(
                "issued_at is {}s {when}; at most {}s either way",
                skew.unsigned_abs() / 1000,
                WINDOW.as_secs()
            ),
        ));
    }
    Ok(Envelope {
        request_id: request_id_s,
        issued_at,
        key_id,
        target,
        command,
        args: m.get("args").cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (SigningKey, TrustedKeys) {
        let (private, public) = SigningKey::generate("ops-1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, private).unwrap();
        (
            SigningKey::load(&p).unwrap(),
            TrustedKeys::parse(&public).unwrap(),
        )
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_without_whitespace() {
        let v: Value =
            serde_json::from_str(r#"{ "b": {"z": 1, "a": [ {"y":2,"x":"é\n"} ]}, "a": null }"#)
                .unwrap();
        assert_eq!(
            canonical(&v),
            r#"{"a":null,"b":{"a":[{"x":"é\n","y":2}],"z":1}}"#
        );
    }

    #[test]
    fn a_signed_envelope_verifies_and_every_change_breaks_it() {
        let (k, trusted) = key();
        let now = 1_700_000_000_000;
        let env = k.sign("gw-1", "sink.pause", json!({"sink": "a"}), "r1", now);
        let bytes = serde_json::to_vec(&env).unwrap();
        let ok = check(&bytes, &trusted, now).unwrap();
        assert_eq!(ok.command, "sink.pause");
        assert_eq!(ok.args, json!({"sink": "a"}));
        for (field, value) in [
            ("target", json!("gw-2")),
            ("command", json!("sink.resume")),
            ("args", json!({"sink": "b"})),
            ("issued_at", json!(now + 1)),
            ("request_id", json!("r2")),
        ] {
            let mut t = env.clone();
            t[field] = value;
            let e = check(&serde_json::to_vec(&t).unwrap(), &trusted, now).unwrap_err();
            assert_eq!(e.reason, Refusal::BadSignature, "{field}");
        }
    }

    #[test]
    fn unsigned_unknown_key_and_stale_envelopes_are_refused_with_their_reason() {
        let (k, trusted) = key();
        let now = 1_700_000_000_000;
        let env = k.sign("gw-1", "ping", Value::Null, "r1", now);
        let mut unsigned = env.clone();
        unsigned.as_object_mut().unwrap().remove("signature");
        let reason = |v: &Value, at: i64| {
            check(&serde_json::to_vec(v).unwrap(), &trusted, at)
                .unwrap_err()
                .reason
        };
        assert_eq!(reason(&unsigned, now), Refusal::Unsigned);
        let (other, _) = key();
        let mut foreign = other.sign("gw-1", "ping", Value::Null, "r1", now);
        foreign["key_id"] = json!("ops-2");
        assert_eq!(reason(&foreign, now), Refusal::UnknownKey);
        let window = WINDOW.as_millis() as i64;
        assert_eq!(reason(&env, now + window + 1), Refusal::Expired);
        assert_eq!(reason(&env, now - window - 1), Refusal::Expired);
        assert!(check(&serde_json::to_vec(&env).unwrap(), &trusted, now + window).is_ok());
        assert_eq!(
            check(b"[1]", &trusted, now).unwrap_err().reason,
            Refusal::BadRequest
        );
    }

    #[test]
    fn a_trusted_keys_file_names_the_line_that_is_wrong() {
        let (_, trusted) = key();
        assert_eq!(trusted.len(), 1);
        assert!(TrustedKeys::parse("# only a comment\n").is_err());
        let e = TrustedKeys::parse("# c\nops-1 not-base64!!\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = TrustedKeys::parse("ops-1 AAAA\n").unwrap_err();
        assert!(e.contains("32 bytes"), "{e}");
        assert!(TrustedKeys::parse("a/b AAAA\n").is_err());
    }
}
