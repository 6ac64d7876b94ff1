//! Device tokens and protected mode.

use gateway::auth::new_token;

use crate::helpers::{request, spawn_app, telemetry, test_settings, try_spawn};

#[test]
fn device_tokens_give_401_403_and_202() {
    let (tok1, line1) = new_token("dev-1").unwrap();
    let (tok2, line2) = new_token("dev-2").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{line1}\n{line2}\n")).unwrap();
    let app = spawn_app(&format!(
        "[http]\ndevice_tokens_file = \"{}\"\n",
        file.display()
    ));
    let post = |auth: Option<&str>| {
        let mut req = ureq::post(&app.url("/ingest/dev-1")).set("Content-Type", "application/json");
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        request(req, Some(&telemetry("1", 1.0)))
    };
    let none = post(None);
    assert_eq!(none.status, 401);
    assert_eq!(none.body["error"]["code"], "unauthorized");
    assert_eq!(post(Some("Bearer wrong")).status, 401);
    let other = post(Some(&format!("Bearer {tok2}")));
    assert_eq!(other.status, 403);
    assert_eq!(other.body["error"]["code"], "forbidden");
    assert_eq!(post(Some(&format!("Bearer {tok1}"))).status, 202);
}

#[test]
fn without_credentials_the_gateway_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path(), "");
    settings.http.addr = "0.0.0.0:0".parse().unwrap();
    let err = try_spawn(settings, |_, t| gateway::startup::sink_factory(t))
        .err()
        .expect("must refuse");
    assert!(
        err.contains("refusing to start") && err.contains("device_tokens_file"),
        "{err}"
    );
}
