//! The layers, their origins and `config print`, through whole
//! configurations (each section's own checks are tested next to it).

use super::*;
use std::time::Duration;

#[test]
fn defaults_alone_give_one_archive_sink_on_loopback() {
    let s = Settings::from_toml("").unwrap();
    assert_eq!(s.http.addr.to_string(), "127.0.0.1:8080");
    assert_eq!(s.sinks.len(), 1);
    match &s.sinks["archive"].target {
        SinkTarget::S3(c) => {
            assert_eq!(c.url, "file://./data/archive");
            // Bounded and compacted: `make run` left alone must not fill the disk.
            let k = c.keeper("archive").unwrap();
            assert_eq!((k.compact, k.max_bytes), (true, Some(1 << 30)));
            // A second of records an object (issue 31).
            assert_eq!(
                s.sinks["archive"].dispatch.batch_max_wait,
                Duration::from_secs(1)
            );
        }
        other => panic!("default sink is {other:?}"),
    }
    assert!(matches!(s.mqtt, MqttMode::Embedded { .. }));
    // The MQTT ingest's defaults, all from config/default.toml.
    let m = s.mqtt.ingest().unwrap();
    assert_eq!(
        (m.receive_maximum, m.session_expiry, m.control),
        (1000, Duration::from_secs(7 * 24 * 3600), true)
    );
    assert_eq!(m.conn.keep_alive, Duration::from_secs(30));
    assert_eq!(
        (m.conn.reconnect.base, m.conn.reconnect.max),
        (Duration::from_millis(200), Duration::from_secs(30))
    );
    assert_eq!(m.conn.max_packet_bytes, 65536 + 4096);
    assert_eq!(s.wal.retention, Duration::from_secs(86400));
}

#[test]
fn an_invalid_file_value_names_the_key_and_the_file() {
    let err = Settings::from_toml("[http]\naddr = \"nonsense\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`http.addr`") && err.contains("file "),
        "{err}"
    );
    let err = Settings::from_toml("[wal]\npolicy = \"sometimes\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`wal.policy`"), "{err}");
    let err = Settings::from_toml("[http]\nbogus = 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bogus") && err.contains("file "), "{err}");
    let err = Settings::from_toml("[sinks.x]\nkind = \"s3\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`sinks.x.url`"), "{err}");
}

#[test]
fn every_sink_kind_checks_its_own_keys() {
    let cases = [
        ("[sinks.k]\nkind = \"kafka\"\nbrokers = \"b:9092\"\n", "`sinks.k.topic`"),
        ("[sinks.k]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\ncompression = \"rar\"\n", "`sinks.k.compression`"),
        ("[sinks.h]\nkind = \"http\"\nurl = \"ftp://x\"\n", "`sinks.h.url`"),
        ("[sinks.h]\nkind = \"http\"\nurl = \"http://x\"\nformat = \"xml\"\n", "`sinks.h.format`"),
        ("[sinks.m]\nkind = \"mqtt\"\nurl = \"tcp://x\"\n", "`sinks.m.url`"),
        ("[sinks.m]\nkind = \"mqtt\"\nurl = \"mqtt://x\"\nca_file = \"/nope\"\n", "`sinks.m.url`"),
        ("[sinks.s]\nkind = \"s3\"\nurl = \"s3://b\"\nendpoint = \"minio:9000\"\n", "`sinks.s.endpoint`"),
        ("[sinks.s]\nkind = \"s3\"\nurl = \"s3://b\"\nretry_budget = 0\n", "`sinks.s.retry_budget`"),
        ("[sinks.x]\nkind = \"carrier-pigeon\"\n", "`sinks.x.kind`"),
        ("[sinks.m]\nkind = \"mqtt\"\nurl = \"mqtt://x\"\nversion = \"6\"\n", "`sinks.m.version`"),
    ];
    for (toml, key) in cases {
        let err = Settings::from_toml(toml).unwrap_err().to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
    let ok = Settings::from_toml(
        "[sinks.k]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n[sinks.k.librdkafka]\n\"linger.ms\" = \"20\"\n\
         [sinks.m]\nkind = \"mqtt\"\nurl = \"mqtt://cloud\"\n[sinks.h]\nkind = \"http\"\nurl = \"https://a/b\"\n",
    )
    .unwrap();
    assert_eq!(ok.sinks.len(), 3);
    match &ok.sinks["m"].target {
        SinkTarget::Mqtt(m) => assert_eq!((m.conn.host.as_str(), m.conn.port), ("cloud", 1883)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_fleet_bundle_sits_between_the_file_and_the_flags_and_is_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("g.toml");
    std::fs::write(&file, "[http]\naddr = \"127.0.0.1:7001\"\nworkers = 1\n").unwrap();
    let bundle = serde_json::json!({"http": {"addr": "127.0.0.1:7002"}, "log": {"level": "debug"}});
    let s = Loaded::load_with_bundle(
        Some(&file),
        false,
        &FlagLayer::default(),
        Some((4, &bundle)),
    )
    .unwrap()
    .settings()
    .unwrap();
    assert_eq!((s.http.addr.port(), s.http.workers), (7002, 1));
    assert_eq!(s.log_level, "debug");
    let flags = FlagLayer {
        http_addr: Some("127.0.0.1:7003".into()),
        ..FlagLayer::default()
    };
    let s = Loaded::load_with_bundle(Some(&file), false, &flags, Some((4, &bundle)))
        .unwrap()
        .settings()
        .unwrap();
    assert_eq!(s.http.addr.port(), 7003);
    let bad = serde_json::json!({"http": {"addr": "nowhere"}});
    let err = Loaded::load_with_bundle(Some(&file), false, &FlagLayer::default(), Some((5, &bad)))
        .unwrap()
        .settings()
        .unwrap_err()
        .to_string();
    assert!(err.contains("set by bundle 5"), "{err}");
    let unknown = serde_json::json!({"htp": {}});
    let err = Loaded::load_with_bundle(None, false, &FlagLayer::default(), Some((6, &unknown)))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("bundle 6"), "{err}");
}

#[test]
fn later_layers_override_earlier_ones_and_are_named_in_errors() {
    let flags = FlagLayer {
        http_addr: Some("bad".into()),
        ..FlagLayer::default()
    };
    let err = Loaded::load(None, false, &flags)
        .unwrap()
        .settings()
        .unwrap_err()
        .to_string();
    assert!(err.contains("flag --http-addr"), "{err}");
    let flags = FlagLayer {
        http_addr: Some("127.0.0.1:9999".into()),
        ..FlagLayer::default()
    };
    let s = Loaded::load(None, false, &flags)
        .unwrap()
        .settings()
        .unwrap();
    assert_eq!(s.http.addr.port(), 9999);
}

#[test]
fn a_fleet_without_trusted_keys_or_with_a_bad_url_names_the_key() {
    assert!(Settings::from_toml("").unwrap().fleet.is_none());
    let e = Settings::from_toml("[fleet]\nurl = \"mqtt://127.0.0.1:1883\"\n").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("invalid `fleet.trusted_keys_file`"),
        "{e}"
    );
    let e = Settings::from_toml(
        "[fleet]\nurl = \"fleet.example.com\"\ntrusted_keys_file = \"/nonexistent\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("invalid `fleet.url`"), "{e}");
    let e = Settings::from_toml(
        "[fleet]\nurl = \"mqtt://h:1\"\ntrusted_keys_file = \"/nonexistent\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent"), "{e}");
    // With its keys file the fleet is on, with config/default.toml's timings.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("fleet-keys");
    let (_, public) = gateway_actors::fleet::verify::SigningKey::generate("ops-1").unwrap();
    std::fs::write(&keys, public).unwrap();
    let fleet = |extra: &str| {
        Settings::from_toml(&format!(
            "[fleet]\nurl = \"mqtt://h:1\"\ntrusted_keys_file = \"{}\"\n{extra}",
            keys.display()
        ))
    };
    let f = fleet("").unwrap().fleet.unwrap();
    assert_eq!(
        (f.probation, f.state_interval, f.groups.len()),
        (Duration::from_secs(60), Duration::from_secs(300), 0)
    );
    let e = fleet("probation = \"soon\"\n").unwrap_err().to_string();
    assert!(e.starts_with("invalid `fleet.probation`"), "{e}");
}

#[test]
fn printing_redacts_secrets() {
    let mut v: Value =
        toml::from_str("[sinks.h]\ntoken = \"s3cr3t\"\ntoken_file = \"/x\"\n").unwrap();
    redact(&mut v);
    let out = toml::to_string(&v).unwrap();
    assert!(!out.contains("s3cr3t") && out.contains("/x"), "{out}");
}

#[test]
fn a_key_of_another_kind_or_no_kind_is_refused_naming_the_key_and_its_file() {
    let cases = [
        (
            "[sinks.h]\nkind = \"http\"\nurl = \"http://x\"\nbrokers = \"b:9092\"\n",
            "`sinks.h.brokers`",
        ),
        (
            "[sinks.s]\nkind = \"s3\"\nurl = \"s3://b\"\npassword_file = \"/x\"\n",
            "`sinks.s.password_file`",
        ),
        (
            "[sinks.k]\nkind = \"kafka\"\nbrokers = \"b\"\ntopic = \"t\"\nbatch_max_record = 5\n",
            "`sinks.k.batch_max_record`",
        ),
        ("[sinks.n]\nurl = \"s3://b\"\n", "`sinks.n.kind`"),
    ];
    for (toml, key) in cases {
        let err = Settings::from_toml(toml).unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains("gateway.toml"),
            "{toml}: {err}"
        );
    }
}

#[test]
fn every_shared_dispatch_key_is_a_field_of_dispatch_keys() {
    let mut t = toml::Table::new();
    for k in DispatchKeys::KEYS {
        let v = if *k == "paused" {
            Value::Boolean(true)
        } else if *k == "budget" {
            toml::toml! { bytes_per_s = 7 }.into()
        } else if *k == "quota" {
            toml::toml! { bytes = 7 }.into()
        } else if *k == "windows" {
            toml::toml! { low = ["01:00-05:00"] }.into()
        } else if *k == "live_share" {
            Value::Float(0.5)
        } else if *k == "reduce" {
            toml::toml! { deadband = { t = 1 } }.into()
        } else {
            Value::Integer(7)
        };
        t.insert(k.to_string(), v);
    }
    let keys: DispatchKeys = Value::Table(t).try_into().unwrap();
    // … and every field is listed in KEYS: serde names them all when it
    // refuses an unknown one.
    let mut t = toml::Table::new();
    t.insert("not_a_key".into(), Value::Boolean(true));
    let err = Value::Table(t)
        .try_into::<DispatchKeys>()
        .unwrap_err()
        .to_string();
    let fields: std::collections::BTreeSet<&str> = err
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("{err}"))
        .split(',')
        .map(|f| {
            f.trim()
                .trim_matches(|c: char| c == '`' || c.is_whitespace())
        })
        .filter(|f| !f.is_empty())
        .collect();
    assert_eq!(
        fields,
        DispatchKeys::KEYS.iter().copied().collect(),
        "{err}"
    );
    let d = keys.build("x").unwrap();
    assert_eq!(d.batch_max_records, 7);
    assert_eq!(d.circuit_cooldown, Duration::from_millis(7));
    assert!(d.paused);
}

#[test]
fn settings_never_print_a_secret_read_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cr3t-token\n").unwrap();
    let s = Settings::from_toml(&format!(
        "[sinks.h]\nkind = \"http\"\nurl = \"http://x\"\ntoken_file = \"{}\"\n",
        token.display()
    ))
    .unwrap();
    match &s.sinks["h"].target {
        SinkTarget::Http(h) => assert_eq!(h.token.as_ref().unwrap().expose(), "s3cr3t-token"),
        other => panic!("{other:?}"),
    }
    let printed = format!("{s:?}");
    assert!(!printed.contains("s3cr3t"), "{printed}");
    assert!(!s.rendered.contains("s3cr3t"), "{}", s.rendered);
}
