//! The status page in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, Selenium from `.venv-test`; `scripts/deps.sh test`
//! installs them): `tests/browser/status_page.py` against the real gateway
//! binary with a real HTTP analytics sink server. Screenshots at 360 and
//! 1920 px are left in `target/status-page/`.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::{free_port, spawn_gateway_binary};

#[test]
fn the_status_page_works_in_a_real_browser_against_the_real_gateway() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-test/bin/python");
    assert!(
        python.exists() && std::path::Path::new("/usr/bin/chromedriver").exists(),
        "the browser test needs .venv-test with selenium and Debian's chromium + chromium-driver: run scripts/deps.sh test"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let analytics_port = free_port();
    // Sink "bad": its server (in the script) answers 400 to everything, so
    // its records become dead letters (for requeue and purge).
    let refuser_port = free_port();
    let config = dir.path().join("gateway.toml");
    // Sink "api": many retries and a high circuit threshold, so with its
    // server stopped it stays "down" with its records pending.
    std::fs::write(
        &config,
        format!(
            "gateway_id = \"edge-browser\"\n\
             [sinks.api]\nkind = \"http\"\nurl = \"http://127.0.0.1:{analytics_port}/ingest\"\n\
             batch_max_wait_ms = 20\nretry_budget = 100000\nretry_base_ms = 50\nretry_max_ms = 200\n\
             circuit_threshold = 100000\n\
             [sinks.bad]\nkind = \"http\"\nurl = \"http://127.0.0.1:{refuser_port}/ingest\"\n\
             batch_max_wait_ms = 20\nretry_budget = 1\nretry_base_ms = 10\nretry_max_ms = 20\n\
             circuit_threshold = 100000\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let gw = spawn_gateway_binary(
        &data,
        port,
        &["--mqtt-url", "off", "--config", config.to_str().unwrap()],
        &[],
    );
    let artifacts = root.join("target/status-page");
    let out = Command::new(&python)
        .arg(root.join("tests/browser/status_page.py"))
        .args(["--base", &format!("http://127.0.0.1:{port}")])
        .arg("--token")
        .arg(data.join("admin.token"))
        .args(["--analytics-port", &analytics_port.to_string()])
        .arg("--analytics-out")
        .arg(dir.path().join("analytics.ndjson"))
        .args(["--refuser-port", &refuser_port.to_string()])
        .args(["--gateway-pid", &gw.id().to_string()])
        .arg("--artifacts")
        .arg(&artifacts)
        .output()
        .expect("the browser test runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok: status page"),
        "the browser test failed (artifacts in {}):\n{stdout}\n{}",
        artifacts.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    for width in [360, 1920] {
        assert!(artifacts.join(format!("status-{width}.png")).exists());
    }
}
