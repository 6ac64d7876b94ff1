//! Secrets never leak: every kind of secret the gateway reads is configured
//! and used against real servers, under a mixed workload at log level
//! `debug` (every crate), and none of them appears in the log, `config
//! print`, the admin API's configuration, `/metrics`, `/readyz` or the audit
//! log.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::analytics::Analytics;
use crate::broker::{mosquitto_pub, Mosquitto, Subscriber};
use crate::helpers::{free_port, request, telemetry, wait_until, GatewayProcess};
use crate::s3::Moto;

/// A value nobody could log by chance: `what` plus random hex.
fn secret(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn gateway(args: &[&str], config: &str, data: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--config", config, "--data-dir"])
        .arg(data)
        .args(args)
        .env_remove("GATEWAY_CONFIG")
        .env_remove("GATEWAY_LOG_LEVEL")
        .output()
        .unwrap()
}

/// `gateway token new DEVICE`: (token, tokens-file line).
fn device_token(device: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["token", "new", device])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
            .trim()
            .to_string()
    };
    (field("token:"), field("tokens-file line:"))
}

fn passwd_file(path: &Path, users: &[(&str, &str)]) {
    for (i, (user, pw)) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd.arg("-b").arg(path).args([user, pw]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

#[test]
fn no_secret_reaches_the_log_config_print_the_admin_api_or_the_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");

    let dev1 = device_token("dev-1");
    let dev2 = device_token("dev-2");
    let admin_token = secret("admintok");
    let mqtt_pw = secret("mqttpw");
    let cloud_pw = secret("cloudpw");
    let s3_key = secret("s3key");
    let s3_secret = secret("s3secret");
    let sasl_pw = secret("saslpw");
    let http_token = secret("httptok");

    // The ingest broker knows the gateway and a device; the cloud broker the sink.
    std::fs::create_dir_all(dir.join("ingest")).unwrap();
    std::fs::create_dir_all(dir.join("cloud")).unwrap();
    passwd_file(
        &dir.join("ingest/passwd"),
        &[("gateway", &mqtt_pw), ("device", "device-pw")],
    );
    passwd_file(&dir.join("cloud/passwd"), &[("cloud", &cloud_pw)]);
    let broker = Mosquitto::start(
        &dir.join("ingest"),
        "allow_anonymous false",
        &format!("password_file {}", dir.join("ingest/passwd").display()),
    );
    let cloud = Mosquitto::start(
        &dir.join("cloud"),
        "allow_anonymous false",
        &format!("password_file {}", dir.join("cloud/passwd").display()),
    );
    let sub = Subscriber::start(
        cloud.port,
        &dir.join("cloud"),
        &["cloud/#"],
        &["-u", "cloud", "-P", &cloud_pw],
    );
    let moto = Moto::start();
    moto.create_bucket("lake");
    let api = Analytics::start();

    let config = format!(
        "gateway_id = \"edge-secrets\"\n\
         [log]\nlevel = \"debug\"\n\
         [http]\ndevice_tokens_file = \"{tokens}\"\nadmin_token_file = \"{admin}\"\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{ingest}\"\nusername = \"gateway\"\npassword_file = \"{mqtt_pw}\"\n\
         [sinks.lake]\nkind = \"s3\"\nurl = \"s3://lake/edge\"\nendpoint = \"{s3}\"\n\
         access_key_id_file = \"{s3_key}\"\nsecret_access_key_file = \"{s3_secret}\"\nbatch_max_wait_ms = 50\n\
         [sinks.api]\nkind = \"http\"\nurl = \"{api}\"\ntoken_file = \"{http_token}\"\nbatch_max_wait_ms = 20\n\
         [sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{cloud}\"\ntopic_prefix = \"cloud\"\n\
         username = \"cloud\"\npassword_file = \"{cloud_pw}\"\nbatch_max_wait_ms = 20\n\
         [sinks.events]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:{kafka}\"\ntopic = \"telemetry\"\n\
         security_protocol = \"SASL_PLAINTEXT\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"gw\"\n\
         sasl_password_file = \"{sasl_pw}\"\nbatch_max_wait_ms = 20\n",
        tokens = write(dir, "tokens", &format!("{}\n{}\n", dev1.1, dev2.1)),
        admin = write(dir, "admin.token", &format!("{admin_token}\n")),
        ingest = broker.port,
        mqtt_pw = write(dir, "mqtt.pw", &format!("{mqtt_pw}\n")),
        s3 = moto.endpoint(),
        s3_key = write(dir, "s3.key", &format!("{s3_key}\n")),
        s3_secret = write(dir, "s3.secret", &format!("{s3_secret}\n")),
        api = api.url(),
        http_token = write(dir, "http.token", &format!("{http_token}\n")),
        cloud = cloud.port,
        cloud_pw = write(dir, "cloud.pw", &format!("{cloud_pw}\n")),
        // Nobody listens there: the SASL password is used at every attempt.
        kafka = free_port(),
        sasl_pw = write(dir, "sasl.pw", &format!("{sasl_pw}\n")),
    );
    let config_path = write(dir, "gateway.toml", &config);

    let port = free_port();
    let log = dir.join("gateway.log");
    let mut gw = GatewayProcess(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--config", &config_path, "run", "--data-dir"])
            .arg(&data)
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .env_remove("GATEWAY_CONFIG")
            .env_remove("GATEWAY_LOG_LEVEL")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("gateway.err")).unwrap(),
            ))
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_until("the gateway is live", Duration::from_secs(20), || {
        ureq::get(&format!("{base}/healthz")).call().is_ok()
    });

    // Devices over HTTP: right tokens, a wrong one, and a token for another device.
    let post = |device: &str, token: &str, id: &str| {
        request(
            ureq::post(&format!("{base}/ingest/{device}"))
                .set("Content-Type", "application/json")
                .set("Authorization", &format!("Bearer {token}")),
            Some(&telemetry(id, 1.0)),
        )
        .status
    };
    for i in 0..10 {
        assert_eq!(post("dev-1", &dev1.0, &format!("h1-{i}")), 202);
        assert_eq!(post("dev-2", &dev2.0, &format!("h2-{i}")), 202);
    }
    assert_eq!(post("dev-1", &dev2.0, "crossed"), 403);
    assert_eq!(post("dev-1", "guessed-token", "guessed"), 401);
    // Devices over MQTT.
    for i in 0..10 {
        let (ok, err) = mosquitto_pub(
            broker.port,
            "devices/dev-3/telemetry",
            &[
                "-u",
                "device",
                "-P",
                "device-pw",
                "-m",
                &telemetry(&format!("m-{i}"), 2.0),
            ],
        );
        assert!(ok, "{err}");
    }
    // The operator: admin API with the token (and once with a wrong one).
    let admin = |method: &str, path: &str, token: &str, body: Option<&str>| {
        request(
            ureq::request(method, &format!("{base}{path}"))
                .set("Authorization", &format!("Bearer {token}"))
                .set("Content-Type", "application/json"),
            body,
        )
    };
    let config_out = admin("GET", "/admin/config", &admin_token, None);
    assert_eq!(config_out.status, 200, "{}", config_out.text);
    let set = admin(
        "POST",
        "/admin/config",
        &admin_token,
        Some(r#"{"settings":{"sinks.api.paused":false}}"#),
    );
    assert_eq!(set.status, 200, "{}", set.text);
    assert_eq!(
        admin("GET", "/admin/sinks", "wrong-admin", None).status,
        401
    );
    let sinks = admin("GET", "/admin/sinks", &admin_token, None);
    assert_eq!(sinks.status, 200, "{}", sinks.text);

    // The secrets were used: the sinks that have servers got everything.
    wait_until(
        "S3, the API and the cloud broker got all 30 records",
        Duration::from_secs(30),
        || {
            moto.dump("lake").len() >= 30
                && api.accepted_keys().len() >= 30
                && sub.messages().len() >= 30
        },
    );
    assert!(api
        .seen()
        .iter()
        .all(|s| s.headers["authorization"] == format!("Bearer {http_token}")));
    let metrics = request(ureq::get(&format!("{base}/metrics")), None).text;
    let readyz = request(ureq::get(&format!("{base}/readyz")), None).text;
    // Let the Kafka client fail a few times with its SASL settings.
    std::thread::sleep(Duration::from_secs(2));
    let pid = gw.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    wait_until("the gateway stops", Duration::from_secs(20), || {
        gw.try_wait().unwrap().is_some()
    });

    // Offline: config print, config get and a CLI action written to the audit log.
    let print = gateway(&["config", "print"], &config_path, &data);
    assert!(print.status.success(), "{print:?}");
    let get = gateway(&["config", "get"], &config_path, &data);
    let pause = gateway(&["sink", "pause", "events"], &config_path, &data);
    assert!(pause.status.success(), "{pause:?}");
    let audit = std::fs::read_to_string(data.join("audit.log")).unwrap();
    assert!(audit.contains("sink.pause"), "{audit}");

    let log_text = std::fs::read_to_string(&log).unwrap();
    // A debug log, with the lines of the clients that handle the secrets.
    let debug_targets: HashSet<&str> = log_text
        .lines()
        .filter(|l| l.contains("\"level\":\"DEBUG\""))
        .filter_map(|l| l.split("\"target\":\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        debug_targets.contains("rumqttc::state") && debug_targets.len() >= 4,
        "debug lines of several crates: {debug_targets:?}"
    );
    let outputs: Vec<(&str, String)> = vec![
        ("log", log_text),
        (
            "stderr",
            std::fs::read_to_string(dir.join("gateway.err")).unwrap(),
        ),
        ("admin config", config_out.text),
        ("admin sinks", sinks.text),
        ("metrics", metrics),
        ("readyz", readyz),
        ("config print", format!("{print:?}")),
        ("config get", format!("{get:?}")),
        ("sink pause", format!("{pause:?}")),
        ("audit.log", audit),
        (
            "runtime.json",
            std::fs::read_to_string(data.join("runtime.json")).unwrap_or_default(),
        ),
    ];
    let secrets = [
        ("device token dev-1", dev1.0.as_str()),
        ("device token dev-2", dev2.0.as_str()),
        ("admin token", admin_token.as_str()),
        ("MQTT password", mqtt_pw.as_str()),
        ("MQTT sink password", cloud_pw.as_str()),
        ("S3 access key", s3_key.as_str()),
        ("S3 secret key", s3_secret.as_str()),
        ("SASL password", sasl_pw.as_str()),
        ("HTTP sink token", http_token.as_str()),
    ];
    for (where_, text) in &outputs {
        for (what, value) in secrets {
            assert!(!text.contains(value), "the {what} is in the {where_}");
        }
    }
    // config print did print the configuration (the files' paths are not secret).
    let printed = String::from_utf8_lossy(&print.stdout);
    assert!(
        printed.contains("sasl.pw") && printed.contains("[sinks.cloud]"),
        "{printed}"
    );
}
