//! The environment layer: a `GATEWAY_*` variable names a key by a rule,
//! not by a list. `GATEWAY_ID` is `gateway_id`; `GATEWAY_{SECTION}_{KEY}`
//! is `{section}.{key}` when `{section}` is a section of
//! `config/default.toml` (so a key may contain `_`:
//! `GATEWAY_HTTP_DEVICE_TOKENS_FILE` is `http.device_tokens_file`); any
//! other `GATEWAY_{KEY}` is a top-level key (`GATEWAY_DATA_DIR`). A
//! variable that names no key (`GATEWAY_CONFIG`, `GATEWAY_ADMIN_URL`) is
//! not configuration and is left alone, as are names of whole tables.
//!
//! A variable's text becomes the TOML value its key takes: a string if the
//! key takes one, else an integer, a float, a boolean or a comma-separated
//! list (`GATEWAY_FLEET_GROUPS=north,line-3`; empty: an empty list). Secrets still come from
//! files only: `GATEWAY_MQTT_PASSWORD_FILE` is the `mqtt.password_file` key.

use toml::Value;

use super::ConfigError;

/// Top-level tables that only a file (or a bundle) can write.
const FILE_ONLY: [&str; 2] = ["sinks", "priority"];

/// The key path that variable `GATEWAY_{name}` sets, or `None` when the
/// name is a whole table. `sections` are the sections of the defaults.
pub(super) fn key_path(name: &str, sections: &[String]) -> Option<Vec<String>> {
    let name = name.to_ascii_lowercase();
    if name == "id" {
        return Some(vec!["gateway_id".into()]);
    }
    for s in sections {
        if let Some(key) = name
            .strip_prefix(s.as_str())
            .and_then(|r| r.strip_prefix('_'))
        {
            return Some(vec![s.clone(), key.to_string()]);
        }
    }
    let table = sections.contains(&name) || FILE_ONLY.contains(&name.as_str());
    (!table).then(|| vec![name])
}

/// The values `text` may stand for, in the order tried: the text itself,
/// then what it parses as (a float before an integer, so that a float key
/// given `3` holds `3.0`, as a file's `3.0` would), then a list.
fn candidates(text: &str) -> Vec<Value> {
    let mut all = vec![Value::String(text.to_string())];
    if let Ok(f) = text.parse() {
        all.push(Value::Float(f));
    }
    if let Ok(i) = text.parse() {
        all.push(Value::Integer(i));
    }
    if let Ok(b) = text.parse() {
        all.push(Value::Boolean(b));
    }
    // An empty text is an empty list (`GATEWAY_FLEET_GROUPS=`: no groups).
    let items = text.split(',').filter(|_| !text.is_empty());
    all.push(Value::Array(
        items.map(|s| Value::String(s.into())).collect(),
    ));
    all
}

/// Which refusal of `tries` says best why the text fits no way: the
/// integer's (`70000` for a `u16`), else the float's or the boolean's,
/// else the text's.
fn best_error<'a>(tries: &[Value], errors: &'a [String]) -> &'a str {
    let rank = |v: &Value| match v {
        Value::Integer(_) => 0,
        Value::Float(_) | Value::Boolean(_) => 1,
        Value::String(_) => 2,
        _ => 3,
    };
    let best = (0..tries.len())
        .min_by_key(|&i| rank(&tries[i]))
        .unwrap_or(0);
    &errors[best]
}

/// A tree that holds one value at `path`.
pub(super) fn tree_at(path: &[String], v: Value) -> Value {
    path.iter().rev().fold(v, |v, k| {
        Value::Table([(k.clone(), v)].into_iter().collect())
    })
}

/// The layer of each variable that names a key, in name order: its layer
/// name (`env GATEWAY_HTTP_ADDR`) and its one-key tree. `fits` says whether
/// a tree is a valid layer (else why); a value that fits no way is an
/// error naming the variable and its key.
pub(super) fn layers(
    vars: impl IntoIterator<Item = (String, String)>,
    sections: &[String],
    fits: impl Fn(&Value) -> Result<(), String>,
) -> Result<Vec<(String, Value)>, ConfigError> {
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(name, _)| name.starts_with("GATEWAY_"))
        .collect();
    vars.sort();
    let mut out = Vec::new();
    for (var, text) in vars {
        let Some(path) = key_path(&var["GATEWAY_".len()..], sections) else {
            continue;
        };
        let tries = candidates(&text);
        let mut errors = Vec::new();
        for v in &tries {
            let tree = tree_at(&path, v.clone());
            match fits(&tree) {
                Ok(()) => {
                    out.push((format!("env {var}"), tree));
                    break;
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.len() < tries.len() {
            continue;
        }
        if errors[0].starts_with("unknown field") {
            continue; // names no key: not configuration
        }
        let why = best_error(&tries, &errors);
        return Err(ConfigError::Layer {
            layer: "environment".into(),
            message: format!("{var} (`{}`): {why}", path.join(".")),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FlagLayer, Loaded};

    fn sections() -> Vec<String> {
        ["log", "http", "ingest", "mqtt", "wal", "otlp", "fleet"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn a_variable_names_its_section_and_a_key_that_may_hold_underscores() {
        let s = sections();
        let path = |n: &str| key_path(n, &s);
        assert_eq!(
            path("HTTP_DEVICE_TOKENS_FILE").unwrap(),
            ["http", "device_tokens_file"]
        );
        assert_eq!(path("ID").unwrap(), ["gateway_id"]);
        assert_eq!(path("DATA_DIR").unwrap(), ["data_dir"]);
        assert_eq!(
            path("WAL_MIN_FREE_DISK_BYTES").unwrap(),
            ["wal", "min_free_disk_bytes"]
        );
        assert_eq!(path("OTLP_ENDPOINT").unwrap(), ["otlp", "endpoint"]);
        assert_eq!(
            path("FLEET_TRUSTED_KEYS_FILE").unwrap(),
            ["fleet", "trusted_keys_file"]
        );
        // A whole table is not a key.
        for table in ["LOG", "SINKS", "PRIORITY"] {
            assert_eq!(path(table), None, "{table}");
        }
    }

    /// The settings that `vars` give on top of the defaults.
    fn with_env(vars: &[(&str, &str)]) -> Result<crate::config::Settings, ConfigError> {
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Loaded::from_layers(None, None, Some(vars), &FlagLayer::default())?.settings()
    }

    #[test]
    fn documented_variables_set_their_keys_and_other_gateway_variables_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("mqtt-password");
        std::fs::write(&password, "s3cr3t\n").unwrap();
        let tokens = dir.path().join("device-tokens");
        std::fs::write(&tokens, "").unwrap();
        let s = with_env(&[
            ("GATEWAY_ID", "gw-env"),
            ("GATEWAY_DATA_DIR", "/var/lib/gw"),
            ("GATEWAY_HTTP_ADDR", "127.0.0.1:7070"),
            ("GATEWAY_HTTP_DEVICE_TOKENS_FILE", tokens.to_str().unwrap()),
            ("GATEWAY_INGEST_RATE_LIMIT_PER_DEVICE", "2.5"),
            ("GATEWAY_INGEST_MAX_BATCH_RECORDS", "10"),
            ("GATEWAY_MQTT_URL", "mqtt://broker:1884"),
            ("GATEWAY_MQTT_VERSION", "5"),
            ("GATEWAY_MQTT_CONTROL", "false"),
            // Never listed anywhere: a key has its variable by the rule.
            ("GATEWAY_MQTT_KEEP_ALIVE", "45s"),
            ("GATEWAY_MQTT_USERNAME", "gw"),
            ("GATEWAY_MQTT_PASSWORD_FILE", password.to_str().unwrap()),
            ("GATEWAY_WAL_MAX_BYTES", "2097152"),
            ("GATEWAY_WAL_RETENTION", "48h"),
            ("GATEWAY_LOG_REPEAT_BURST", "3"),
            ("GATEWAY_OTLP_ENDPOINT", "http://otel:4318"),
            ("GATEWAY_FLEET_GROUPS", "north,line-3"),
            // Not configuration: read by the CLI, the build and the tests.
            ("GATEWAY_CONFIG", "/nonexistent.toml"),
            ("GATEWAY_ADMIN_URL", "http://127.0.0.1:1"),
            ("GATEWAY_BIN", "/usr/bin/gateway"),
            ("GATEWAY_LOG", "whatever"),
            ("OTHER_HTTP_ADDR", "nonsense"),
        ])
        .unwrap();
        assert_eq!(s.gateway_id, "gw-env");
        assert_eq!(s.data_dir, std::path::Path::new("/var/lib/gw"));
        assert_eq!(s.http.addr.port(), 7070);
        assert_eq!(s.http.device_tokens_file.as_deref(), Some(tokens.as_path()));
        assert_eq!(s.ingest.rate.per_second, 2.5);
        assert_eq!(s.ingest.limits.max_batch_records, 10);
        let mqtt = s.mqtt.ingest().unwrap();
        assert_eq!((mqtt.conn.host.as_str(), mqtt.conn.port), ("broker", 1884));
        assert!(!mqtt.control);
        assert_eq!(mqtt.conn.keep_alive.as_secs(), 45);
        assert_eq!(mqtt.conn.username.as_deref(), Some("gw"));
        assert_eq!(mqtt.conn.password.as_ref().unwrap().expose(), "s3cr3t");
        assert_eq!(s.wal.max_bytes, 2 << 20);
        assert_eq!(s.wal.retention.as_secs(), 48 * 3600);
        assert_eq!(s.log_repeats.burst, 3);
        assert_eq!(s.otlp_endpoint.as_deref(), Some("http://otel:4318"));
        assert!(!s.rendered.contains("s3cr3t"), "{}", s.rendered);
        // A list; and a float key given an integer holds a float, as `config
        // print` has always shown it.
        let printed: toml::Table = toml::from_str(&s.rendered).unwrap();
        assert_eq!(
            printed["fleet"]["groups"],
            Value::Array(vec!["north".into(), "line-3".into()])
        );
        assert_eq!(
            printed["ingest"]["rate_limit_per_device"],
            Value::Float(2.5)
        );
        let s = with_env(&[
            ("GATEWAY_INGEST_RATE_LIMIT_PER_DEVICE", "3"),
            ("GATEWAY_FLEET_GROUPS", ""),
        ])
        .unwrap();
        let printed: toml::Table = toml::from_str(&s.rendered).unwrap();
        assert_eq!(
            printed["ingest"]["rate_limit_per_device"],
            Value::Float(3.0)
        );
    }

    #[test]
    fn a_variable_of_the_wrong_type_is_refused_naming_it_and_its_key() {
        let e = with_env(&[("GATEWAY_WAL_MAX_BYTES", "lots")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("environment: GATEWAY_WAL_MAX_BYTES (`wal.max_bytes`)"),
            "{e}"
        );
        let e = with_env(&[("GATEWAY_MQTT_RECEIVE_MAXIMUM", "70000")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GATEWAY_MQTT_RECEIVE_MAXIMUM") && e.contains("70000"),
            "{e}"
        );
        let e = with_env(&[("GATEWAY_HTTP_ADDR", "nowhere")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`http.addr`") && e.contains("set by env GATEWAY_HTTP_ADDR"),
            "{e}"
        );
    }

    #[test]
    fn every_key_of_the_defaults_has_its_variable_by_the_rule() {
        let defaults: Value = toml::from_str(crate::config::DEFAULTS_TOML).unwrap();
        let sections: Vec<String> = defaults
            .as_table()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k.clone())
            .collect();
        let mut vars = Vec::new();
        let mut want = Vec::new();
        for (section, keys) in defaults.as_table().unwrap() {
            let keys = match keys {
                Value::Table(t) => t
                    .iter()
                    .map(|(k, v)| (format!("{section}_{k}"), v))
                    .collect(),
                v => vec![(section.clone(), v)],
            };
            for (name, v) in keys {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => a
                        .iter()
                        .map(|v| v.as_str().unwrap())
                        .collect::<Vec<_>>()
                        .join(","),
                    v => v.to_string(),
                };
                let var = format!("GATEWAY_{}", name.to_uppercase());
                want.push((format!("env {var}"), v.clone()));
                vars.push((var, text));
            }
        }
        assert!(want.len() >= 30, "{want:?}");
        let fits =
            |t: &Value| crate::config::fits(&defaults, t).map_err(|e| e.message().to_string());
        let mut got = layers(vars, &sections, fits).unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got.len(), want.len());
        for ((layer, tree), (want_layer, value)) in got.iter().zip(&want) {
            assert_eq!(layer, want_layer);
            let mut leaf = tree;
            while let Value::Table(t) = leaf {
                leaf = t.values().next().unwrap();
            }
            assert_eq!(leaf, value, "{layer}");
        }
    }
}
