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
