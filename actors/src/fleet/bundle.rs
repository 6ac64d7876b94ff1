//! Config bundles (`bundle.apply`, DESIGN §11): a signed config layer
//! between the file and the environment (defaults < file < bundle < env <
//! flags), applied by re-executing the gateway, kept only after a
//! probation, rolled back otherwise.
//!
//! The bundle travels as the `args` of a fleet command envelope,
//! `{"version": N, "settings": {…}}`: the envelope's Ed25519 signature
//! covers it, so a bundle is as authentic, fresh and unreplayable as any
//! other fleet command ([`super::verify`], [`super::seen`]).
//!
//! ## On disk: `{data_dir}/bundles/`
//! - `v{N}.json`: one bundle (`{version, settings, sinks_up, …}`), written
//!   once, before anything names it.
//! - `state.json`: the one commit point, `{active, previous, probation,
//!   status}` where the first three are versions (or null). Every
//!   transition rewrites only this file (temp, fsync, rename, directory
//!   fsync), so a crash or a power cut leaves either the old or the new
//!   state, never a mix. Bundle files no state names are deleted at start.
//!
//! ## Life of a bundle
//! 1. `bundle.apply` is checked ([`check_apply`]: version above the
//!    active one, no inline secret, no `data_dir`/`gateway_id`), the merged
//!    configuration is validated by the caller's hook, and the bundle is
//!    staged: `status = applying`, `probation = N`. Then the gateway stops
//!    cleanly (as on SIGTERM) and re-executes itself.
//! 2. At start ([`BundleStore::boot`]) an `applying` bundle becomes
//!    `probation` (on disk, before it is used) and is layered in.
//! 3. The probation ([`probation`]) passes: `active = N`, `previous = the
//!    old active`, `status = active`. It fails: `status = rolled_back`
//!    with the reason, and the gateway re-executes on its active bundle.
//! 4. A start that finds `status = probation` means the process died
//!    during probation (crash, kill -9, power cut): the bundle is rolled
//!    back ("crashed during probation") before anything uses it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::durable;

/// The sub-directory of the data dir that holds the bundles.
pub const DIR: &str = "bundles";

/// Key names whose values are secrets: a bundle may only name a file
/// holding one (`*_file`), never carry the value.
const SECRET_WORDS: [&str; 6] = [
    "password",
    "secret",
    "token",
    "private_key",
    "access_key",
    "api_key",
];

/// Keys a bundle may not set: they locate the bundles and name the
/// gateway on the fleet.
const FORBIDDEN: [&str; 2] = ["data_dir", "gateway_id"];

/// One config bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// Strictly increasing per gateway.
    pub version: u64,
    /// The config layer (TOML's shape, as JSON).
    pub settings: Value,
    /// The sinks that were up when it was applied (probation keeps them up).
    #[serde(default)]
    pub sinks_up: Vec<String>,
    /// When it was applied, epoch ms.
    #[serde(default)]
    pub applied_at_ms: i64,
    /// The fleet request that carried it.
    #[serde(default)]
    pub request_id: String,
}

/// Where a bundle is in its life (the state's `bundle.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// No bundle was ever applied.
    #[default]
    None,
    /// Accepted; the gateway is restarting with it.
    Applying,
    /// Running with it; not yet confirmed.
    Probation,
    /// Confirmed.
    Active,
    /// Refused by its probation, or the gateway died during it.
    RolledBack,
}

impl Status {
    /// The name in the state and the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Applying => "applying",
            Status::Probation => "probation",
            Status::Active => "active",
            Status::RolledBack => "rolled_back",
        }
    }
}

/// `state.json`: the versions in each role and the status of the last one applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreState {
    /// The confirmed bundle in force (none: the file and env alone).
    pub active: Option<u64>,
    /// The bundle before it.
    pub previous: Option<u64>,
    /// The bundle being applied or on probation.
    pub probation: Option<u64>,
    /// The status of `version`.
    pub status: Status,
    /// The version the status is about (the last one applied).
    pub version: Option<u64>,
    /// Why it was rolled back.
    pub reason: Option<String>,
    /// When the status last changed, epoch ms.
    pub at_ms: i64,
}

impl StoreState {
    /// The state document's `bundle` field.
    pub fn report(&self) -> Value {
        let mut v = json!({
            "version": self.version,
            "status": self.status.as_str(),
            "active": self.active,
        });
        if let Some(r) = &self.reason {
            v["reason"] = Value::String(crate::secret::redact(r, 160));
        }
        v
    }
}

/// What a start runs with.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The bundle to layer in (the one on probation, else the active one).
    pub layer: Option<Bundle>,
    /// True when `layer` is on probation.
    pub probation: bool,
    /// The state after the boot decision (already on disk).
    pub state: StoreState,
}

/// Why a `bundle.apply` was refused: the reply's `error` and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The version is not above the active one.
    #[error("stale_version: {0}")]
    StaleVersion(String),
    /// A secret value inside the bundle.
    #[error("inline_secret: {0}")]
    InlineSecret(String),
    /// The merged configuration does not validate, or the bundle is malformed.
    #[error("invalid_bundle: {0}")]
    Invalid(String),
    /// Another bundle is being applied or on probation.
    #[error("busy: {0}")]
    Busy(String),
    /// The bundle could not be stored.
    #[error("storage: {0}")]
    Storage(String),
}

impl Refusal {
    /// The reply's `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::StaleVersion(_) => "stale_version",
            Refusal::InlineSecret(_) => "inline_secret",
            Refusal::Invalid(_) => "invalid_bundle",
            Refusal::Busy(_) => "busy",
            Refusal::Storage(_) => "storage",
        }
    }

    /// The sentence of the reply.
    pub fn message(&self) -> String {
        match self {
            Refusal::StaleVersion(m)
            | Refusal::InlineSecret(m)
            | Refusal::Invalid(m)
            | Refusal::Busy(m)
            | Refusal::Storage(m) => m.clone(),
        }
    }
}

/// Checks the `args` of a `bundle.apply` against the stored state: a
/// well-formed `{version, settings}`, a version above the active one, no
/// inline secret, no forbidden key. (Whether the merged configuration
/// validates is the caller's hook.)
pub fn check_apply(args: &Value, state: &StoreState) -> Result<(u64, Value), Refusal> {
    let obj = args.as_object().ok_or_else(|| {
        Refusal::Invalid("args must be {\"version\": N, \"settings\": {…}}".into())
    })?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "version" | "settings"))
    {
        return Err(Refusal::Invalid(format!(
            "unknown field {k:?} (only version and settings)"
        )));
    }
    let version = obj
        .get("version")
        .and_then(Value::as_u64)
        .filter(|v| *v > 0)
        .ok_or_else(|| Refusal::Invalid("\"version\" must be an integer above 0".into()))?;
    let settings = obj
        .get("settings")
        .filter(|s| s.is_object())
        .cloned()
        .ok_or_else(|| Refusal::Invalid("\"settings\" must be an object".into()))?;
    if let Some(p) = state.probation {
        return Err(Refusal::Busy(format!(
            "bundle {p} is {}; send again when it is settled",
            state.status.as_str()
        )));
    }
    if let Some(active) = state.active.filter(|a| version <= *a) {
        return Err(Refusal::StaleVersion(format!(
            "version {version} is not above the active bundle {active}"
        )));
    }
    for k in FORBIDDEN {
        if settings.get(k).is_some() {
            return Err(Refusal::Invalid(format!(
                "{k:?} cannot be set by a bundle (it locates the bundles and names the gateway)"
            )));
        }
    }
    if let Some(key) = inline_secret(&settings, "") {
        return Err(Refusal::InlineSecret(format!(
            "`{key}` holds a secret value; a bundle may only name a file (`…_file`) that holds it on the gateway"
        )));
    }
    Ok((version, settings))
}

/// The dotted key of the first secret value in `v`, if any.
fn inline_secret(v: &Value, prefix: &str) -> Option<String> {
    match v {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            let lower = k.to_ascii_lowercase();
            let secret =
                SECRET_WORDS.iter().any(|w| lower.contains(w)) && !lower.ends_with("_file");
            if secret && !v.is_object() && !v.is_null() {
                Some(key)
            } else {
                inline_secret(v, &key)
            }
        }),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| inline_secret(v, &format!("{prefix}[{i}]"))),
        _ => None,
    }
}

/// The bundles of one data dir.
#[derive(Debug, Clone)]
pub struct BundleStore {
    dir: PathBuf,
}

impl BundleStore {
    /// Opens (and creates, durably) `{data_dir}/bundles`.
    pub fn open(data_dir: &Path) -> Result<Self, String> {
        let dir = data_dir.join(DIR);
        durable::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes `name` durably: temp file, fsync, rename, directory fsync.
    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), String> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
        let io = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        durable::sync_dir(&self.dir).map_err(io)
    }

    fn file(version: u64) -> String {
        format!("v{version}.json")
    }

    /// The stored state (all none when no bundle was ever applied).
    pub fn state(&self) -> Result<StoreState, String> {
        Ok(self.read("state.json")?.unwrap_or_default())
    }

    fn set_state(&self, s: &StoreState) -> Result<(), String> {
        self.write("state.json", s)
    }

    /// Bundle `version`.
    pub fn bundle(&self, version: u64) -> Result<Bundle, String> {
        self.read(&Self::file(version))?
            .ok_or_else(|| format!("bundle {version} is missing from {}", self.dir.display()))
    }

    /// Stores `b` and marks it `applying` (the next start runs it on probation).
    pub fn stage(&self, b: &Bundle) -> Result<StoreState, String> {
        self.write(&Self::file(b.version), b)?;
        let mut s = self.state()?;
        s.probation = Some(b.version);
        s.status = Status::Applying;
        s.version = Some(b.version);
        s.reason = None;
        s.at_ms = crate::wal::now_ms();
        self.set_state(&s)?;
        Ok(s)
    }

    /// Decides what this start runs with, and records the decision first.
    pub fn boot(&self) -> Result<Boot, String> {
        let mut s = self.state()?;
        let mut probation = false;
        match (s.status, s.probation) {
            (Status::Applying, Some(_)) => {
                s.status = Status::Probation;
                s.at_ms = crate::wal::now_ms();
                self.set_state(&s)?;
                probation = true;
            }
            (Status::Probation, Some(v)) => {
                tracing::warn!(
                    version = v,
                    "the gateway stopped during the probation of a bundle; rolling it back"
                );
                s = self.rolled_back(s, "crashed during probation")?;
            }
            (_, Some(v)) => {
                s.probation = None;
                tracing::warn!(
                    version = v,
                    "a bundle was staged without a status; dropping it"
                );
                self.set_state(&s)?;
            }
            _ => {}
        }
        let version = if probation { s.probation } else { s.active };
        let layer = version.map(|v| self.bundle(v)).transpose()?;
        self.collect_garbage(&s);
        Ok(Boot {
            layer,
            probation,
            state: s,
        })
    }

    fn rolled_back(&self, mut s: StoreState, reason: &str) -> Result<StoreState, String> {
        s.version = s.probation.take().or(s.version);
        s.status = Status::RolledBack;
        s.reason = Some(reason.to_string());
        s.at_ms = crate::wal::now_ms();
        self.set_state(&s)?;
        Ok(s)
    }

    /// The bundle on probation is kept: it becomes the active one.
    pub fn promote(&self) -> Result<StoreState, String> {
        let mut s = self.state()?;
        let Some(v) = s.probation.take() else {
            return Err("no bundle is on probation".into());
        };
        s.previous = s.active.replace(v);
        s.status = Status::Active;
        s.version = Some(v);
        s.reason = None;
        s.at_ms = crate::wal::now_ms();
        self.set_state(&s)?;
        self.collect_garbage(&s);
        Ok(s)
    }

    /// The bundle on probation (or being applied) is dropped, for `reason`.
    pub fn roll_back(&self, reason: &str) -> Result<StoreState, String> {
        let s = self.state()?;
        self.rolled_back(s, reason)
    }

    /// Deletes the bundle files no role names (best effort).
    fn collect_garbage(&self, s: &StoreState) {
        let keep: Vec<String> = [s.active, s.previous, s.probation]
            .into_iter()
            .flatten()
            .map(Self::file)
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('v') && name.ends_with(".json") && !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(v: u64) -> Bundle {
        Bundle {
            version: v,
            settings: json!({"log": {"level": "info"}}),
            sinks_up: vec![],
            applied_at_ms: 0,
            request_id: format!("r{v}"),
        }
    }

    #[test]
    fn a_version_not_above_the_active_one_is_stale_and_a_pending_one_is_busy() {
        let s = StoreState {
            active: Some(3),
            ..StoreState::default()
        };
        let args = |v: u64| json!({"version": v, "settings": {}});
        assert_eq!(
            check_apply(&args(3), &s).unwrap_err().code(),
            "stale_version"
        );
        assert_eq!(
            check_apply(&args(2), &s).unwrap_err().code(),
            "stale_version"
        );
        assert_eq!(check_apply(&args(4), &s).unwrap().0, 4);
        let pending = StoreState {
            probation: Some(4),
            status: Status::Probation,
            ..s
        };
        assert_eq!(check_apply(&args(5), &pending).unwrap_err().code(), "busy");
    }

    #[test]
    fn inline_secrets_are_refused_naming_the_key_and_file_paths_are_accepted() {
        let s = StoreState::default();
        let bad = json!({"version": 1, "settings": {"sinks": {"cloud": {"kind": "http", "token": "abc"}}}});
        let e = check_apply(&bad, &s).unwrap_err();
        assert_eq!(e.code(), "inline_secret");
        assert!(e.message().contains("sinks.cloud.token"), "{e}");
        let bad = json!({"version": 1, "settings": {"mqtt": {"password": "x"}}});
        assert_eq!(check_apply(&bad, &s).unwrap_err().code(), "inline_secret");
        let ok = json!({"version": 1, "settings": {"sinks": {"cloud": {"token_file": "/etc/t"}}, "mqtt": {"password_file": "/p"}}});
        assert!(check_apply(&ok, &s).is_ok());
        let forbidden = json!({"version": 1, "settings": {"data_dir": "/tmp"}});
        assert_eq!(
            check_apply(&forbidden, &s).unwrap_err().code(),
            "invalid_bundle"
        );
    }

    #[test]
    fn a_bundle_goes_applying_probation_active_and_a_death_on_probation_rolls_it_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BundleStore::open(tmp.path()).unwrap();
        assert!(store.boot().unwrap().layer.is_none());
        store.stage(&bundle(1)).unwrap();
        let boot = store.boot().unwrap();
        assert!(boot.probation);
        assert_eq!(boot.layer.unwrap().version, 1);
        assert_eq!(boot.state.status, Status::Probation);
        let s = store.promote().unwrap();
        assert_eq!((s.active, s.status), (Some(1), Status::Active));

        store.stage(&bundle(2)).unwrap();
        assert!(store.boot().unwrap().probation);
        // The process dies during probation: the next start rolls it back.
        let boot = store.boot().unwrap();
        assert!(!boot.probation);
        assert_eq!(boot.layer.unwrap().version, 1);
        assert_eq!(boot.state.status, Status::RolledBack);
        assert_eq!(boot.state.version, Some(2));
        assert_eq!(
            boot.state.reason.as_deref(),
            Some("crashed during probation")
        );
        assert!(!store.dir().join("v2.json").exists());

        store.stage(&bundle(3)).unwrap();
        store.boot().unwrap();
        store.promote().unwrap();
        let s = store.state().unwrap();
        assert_eq!((s.active, s.previous), (Some(3), Some(1)));
        let r = store.boot().unwrap();
        assert_eq!(r.layer.unwrap().version, 3);
        assert!(store.dir().join("v1.json").exists());
    }
}
