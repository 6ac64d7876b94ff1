//! HTTPS and client-certificate authentication on the HTTP server, checked
//! with curl (a real TLS client).

use std::process::Command;

use crate::broker::Certs;
use crate::helpers::{spawn_app, telemetry};

fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A gateway on HTTPS that requires client certificates from `certs`' CA.
fn spawn_mtls_app(certs: &Certs) -> crate::helpers::TestApp {
    spawn_app(&format!(
        "[http]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        certs.path("server.crt"),
        certs.path("server.key"),
        certs.path("ca.crt")
    ))
}

#[test]
fn https_with_client_certificates_accepts_a_certified_client_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), &["dev-1"]);
    let app = spawn_mtls_app(&certs);
    let url = app.base.replace("http://", "https://") + "/ingest/dev-1";
    let body = telemetry("tls-1", 1.0);
    let (code, out) = curl(&[
        "--cacert",
        &certs.path("ca.crt"),
        "--cert",
        &certs.path("dev-1.crt"),
        "--key",
        &certs.path("dev-1.key"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &url,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("202"), "{out}");

    let (code, _) = curl(&[
        "--cacert",
        &certs.path("ca.crt"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &url,
    ]);
    assert_ne!(
        code, 0,
        "a client without a certificate must be refused in the handshake"
    );
    let (code, _) = curl(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &app.url("/ingest/dev-1"),
    ]);
    assert_ne!(code, 0, "plain HTTP must not be served on the HTTPS port");
}

#[test]
fn the_admin_certificate_opens_the_admin_api_and_a_device_certificate_gets_403() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), &["dev-1", "gateway-admin"]);
    let app = spawn_mtls_app(&certs);
    let url = app.base.replace("http://", "https://") + "/admin/wal";
    let as_client = |name: &str| {
        curl(&[
            "--cacert",
            &certs.path("ca.crt"),
            "--cert",
            &certs.path(&format!("{name}.crt")),
            "--key",
            &certs.path(&format!("{name}.key")),
            &url,
        ])
    };
    let (code, out) = as_client("gateway-admin");
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("200") && out.contains("\"sinks\""), "{out}");
    let (code, out) = as_client("dev-1");
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("403") && out.contains("forbidden"), "{out}");
    // The status page's document too: the certificate is enough, no token.
    let status = app.base.replace("http://", "https://") + "/admin/status";
    let (code, out) = curl(&[
        "--cacert",
        &certs.path("ca.crt"),
        "--cert",
        &certs.path("gateway-admin.crt"),
        "--key",
        &certs.path("gateway-admin.key"),
        &status,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("200") && out.contains("\"gateway\""), "{out}");

    // The CLI reaches the same API with the admin certificate and no token.
    let elsewhere = tempfile::tempdir().unwrap();
    let api = app.base.replace("http://127.0.0.1", "https://localhost");
    let cli = |cert: &str| {
        crate::cli::gateway(
            &[
                "--data-dir",
                elsewhere.path().to_str().unwrap(),
                "--admin-url",
                &api,
                "--admin-ca-file",
                &certs.path("ca.crt"),
                "--admin-cert-file",
                &certs.path(&format!("{cert}.crt")),
                "--admin-key-file",
                &certs.path(&format!("{cert}.key")),
                "--json",
                "sink",
                "list",
            ],
            &[],
        )
    };
    let (code, out, err) = cli("gateway-admin");
    assert_eq!(code, 0, "{err}");
    let sinks: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(sinks[0]["name"], "archive");
    let (code, _, err) = cli("dev-1");
    assert_eq!(code, 1);
    assert!(err.contains("403"), "{err}");
}

/// A client certificate signed by the dev CA with `cn` and DNS SAN `san`.
fn cert_with_san(certs: &Certs, name: &str, cn: &str, san: &str) {
    let p = |f: &str| certs.path(f);
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p(&format!("{name}.key")),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &p(&format!("{name}.key")),
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        &p(&format!("{name}.csr")),
    ]);
    std::fs::write(
        p(&format!("{name}.ext")),
        format!("subjectAltName=DNS:{san}\nextendedKeyUsage=clientAuth\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&format!("{name}.csr")),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&format!("{name}.ext")),
        "-out",
        &p(&format!("{name}.crt")),
    ]);
}

/// The device identity rule (README "Device credentials"), every case:
/// with client certificates on, a record for device D needs a certificate
/// whose CN or a DNS SAN is D; with tokens configured as well, D's token too.
#[test]
fn with_client_certificates_the_certificate_must_name_the_device_and_with_tokens_both_must() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), &["dev-1", "dev-2", "gateway-admin"]);
    cert_with_san(&certs, "board-7", "sensor-board-7", "dev-7");
    let post = |app: &crate::helpers::TestApp, cert: &str, device: &str, token: Option<&str>| {
        let url = app.base.replace("http://127.0.0.1", "https://localhost") + "/ingest/" + device;
        let body = telemetry(&format!("{cert}-{device}-{}", token.is_some()), 1.0);
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec![
            "--cacert".to_string(),
            certs.path("ca.crt"),
            "--cert".to_string(),
            certs.path(&format!("{cert}.crt")),
            "--key".to_string(),
            certs.path(&format!("{cert}.key")),
            "-H".to_string(),
            "Content-Type: application/json".to_string(),
            "-d".to_string(),
            body,
        ];
        if let Some(a) = auth {
            args.extend(["-H".to_string(), a]);
        }
        args.push(url);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, out) = curl(&refs);
        let (text, code) = out.rsplit_once('\n').unwrap();
        (code.parse::<u16>().unwrap(), text.to_string())
    };

    let metric = |app: &crate::helpers::TestApp, series: &str| {
        let url = app.base.replace("http://127.0.0.1", "https://localhost") + "/metrics";
        let (_, out) = curl(&[
            "--cacert",
            &certs.path("ca.crt"),
            "--cert",
            &certs.path("gateway-admin.crt"),
            "--key",
            &certs.path("gateway-admin.key"),
            &url,
        ]);
        crate::helpers::metric_value(&out, series)
    };

    // Certificates only: they are the credentials (also off loopback).
    let app = spawn_app(&format!(
        "[http]\naddr = \"0.0.0.0:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        certs.path("server.crt"),
        certs.path("server.key"),
        certs.path("ca.crt")
    ));
    assert_eq!(post(&app, "dev-1", "dev-1", None).0, 202, "CN = device");
    assert_eq!(
        post(&app, "board-7", "dev-7", None).0,
        202,
        "a DNS SAN = device"
    );
    let (code, text) = post(&app, "dev-1", "dev-2", None);
    assert_eq!(code, 403, "another device's id: {text}");
    assert!(
        text.contains("CN=dev-1") && text.contains("not device dev-2"),
        "{text}"
    );
    assert_eq!(
        post(&app, "board-7", "sensor-board-7", None).0,
        202,
        "the CN counts too"
    );
    assert_eq!(
        post(&app, "gateway-admin", "dev-1", None).0,
        403,
        "the admin certificate is no device"
    );
    assert_eq!(
        metric(
            &app,
            r#"gateway_ingest_rejected_total{reason="forbidden",source="http"}"#
        ),
        2.0,
        "refusals are counted"
    );
    drop(app);

    // Certificates and tokens: both must name the device.
    let tokens = dir.path().join("device-tokens");
    let (t1, line1) = gateway::auth::new_token("dev-1").unwrap();
    let (t2, line2) = gateway::auth::new_token("dev-2").unwrap();
    std::fs::write(&tokens, format!("{line1}\n{line2}\n")).unwrap();
    let app = spawn_app(&format!(
        "[http]\ndevice_tokens_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        tokens.display(),
        certs.path("server.crt"),
        certs.path("server.key"),
        certs.path("ca.crt")
    ));
    assert_eq!(
        post(&app, "dev-1", "dev-1", Some(&t1)).0,
        202,
        "both name dev-1"
    );
    assert_eq!(
        post(&app, "dev-1", "dev-1", None).0,
        401,
        "a certificate without a token"
    );
    assert_eq!(
        post(&app, "dev-1", "dev-1", Some(&t2)).0,
        403,
        "dev-2's token with dev-1's certificate"
    );
    assert_eq!(
        post(&app, "dev-2", "dev-1", Some(&t1)).0,
        403,
        "dev-1's token with dev-2's certificate"
    );
    assert_eq!(
        metric(
            &app,
            r#"gateway_ingest_records_total{outcome="accepted",source="http"}"#
        ),
        1.0,
        "nothing refused was stored"
    );
}

/// The SHA-256 fingerprint of the certificate the server at `port` shows a
/// new connection.
fn served_fingerprint(certs: &Certs, port: u16) -> String {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername localhost -cert {} -key {} </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256",
        certs.path("dev-1.crt"),
        certs.path("dev-1.key")
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Certificate rotation on a running gateway (the real binary): a client
/// keeps sending while the server certificate is replaced and SIGHUP
/// reloads it; new connections get the new certificate; a broken file is
/// refused by `tls.reload` and the current certificate stays; every
/// acknowledged record is stored once.
#[test]
fn the_server_certificate_is_rotated_on_sighup_while_a_client_keeps_sending() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), &["dev-1", "gateway-admin"]);
    let port = crate::helpers::free_port();
    let data = dir.path().join("data");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nurl = \"off\"\n[http]\naddr = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_ca_file = \"{}\"\n",
            certs.path("server.crt"),
            certs.path("server.key"),
            certs.path("ca.crt")
        ),
    )
    .unwrap();
    let gw = crate::helpers::GatewayProcess(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "run",
                "--log-level",
                "warn",
            ])
            .env_remove("GATEWAY_CONFIG")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("https://localhost:{port}");
    let as_client = |client: &str, extra: &[&str]| {
        let mut args = vec![
            "--cacert".to_string(),
            certs.path("ca.crt"),
            "--cert".to_string(),
            certs.path(&format!("{client}.crt")),
            "--key".to_string(),
            certs.path(&format!("{client}.key")),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs).1
    };
    crate::helpers::wait_until("HTTPS up", Duration::from_secs(20), || {
        as_client("dev-1", &[&format!("{url}/healthz")]).ends_with("200")
    });
    let before = served_fingerprint(&certs, port);
    assert!(before.contains("Fingerprint"), "{before}");

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let sender = {
        let (stop, acked, certs_dir, url) =
            (stop.clone(), acked.clone(), certs.dir.clone(), url.clone());
        std::thread::spawn(move || {
            let p = |f: &str| certs_dir.join(f).display().to_string();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = telemetry(&format!("r{i}"), 1.0);
                let (_, out) = curl(&[
                    "--cacert",
                    &p("ca.crt"),
                    "--cert",
                    &p("dev-1.crt"),
                    "--key",
                    &p("dev-1.key"),
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    &body,
                    &format!("{url}/ingest/dev-1"),
                ]);
                assert!(
                    out.ends_with("202"),
                    "request {i} during the rotation: {out}"
                );
                acked.lock().unwrap().push(format!("dev-1:r{i}"));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // A new server key and certificate from the same CA, then SIGHUP.
    std::fs::remove_file(certs.dir.join("server.crt")).unwrap();
    std::fs::remove_file(certs.dir.join("server.key")).unwrap();
    Certs::generate(dir.path(), &[]);
    let pid = gw.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    crate::helpers::wait_until(
        "new connections get the new certificate",
        Duration::from_secs(10),
        || {
            let now = served_fingerprint(&certs, port);
            now.contains("Fingerprint") && now != before
        },
    );
    let rotated = served_fingerprint(&certs, port);

    // A broken certificate file: refused, the current one stays.
    let good = std::fs::read(certs.dir.join("server.crt")).unwrap();
    std::fs::write(certs.dir.join("server.crt"), "not a certificate").unwrap();
    let out = as_client(
        "gateway-admin",
        &["-X", "POST", &format!("{url}/admin/commands/tls.reload")],
    );
    assert!(
        out.ends_with("400") && out.contains("the current certificate stays"),
        "{out}"
    );
    assert_eq!(served_fingerprint(&certs, port), rotated);
    std::fs::write(certs.dir.join("server.crt"), good).unwrap();
    let out = as_client(
        "gateway-admin",
        &["-X", "POST", &format!("{url}/admin/commands/tls.reload")],
    );
    assert!(out.ends_with("200"), "{out}");

    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    sender
        .join()
        .expect("every request during the rotation got 202");
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 5, "the client kept sending: {}", acked.len());
    let archive = data.join("archive");
    crate::helpers::wait_until(
        "every acknowledged record archived",
        Duration::from_secs(20),
        || crate::helpers::archived_records(&archive).len() >= acked.len(),
    );
    let records = crate::helpers::archived_records(&archive);
    assert_eq!(records.len(), acked.len(), "each once");
    assert_eq!(
        crate::helpers::record_keys(&records),
        acked.iter().cloned().collect(),
        "exactly the acknowledged records"
    );
    drop(gw);
}
