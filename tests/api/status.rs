//! The status page (DESIGN §12): `GET /`, its assets and headers, and
//! `GET /admin/status`, the document the page polls and `gateway status`
//! prints. The page in a real browser: `status_page.rs`.

use std::time::Duration;

use serde_json::Value;

use crate::cli::gateway;
use crate::helpers::{free_port, request, spawn_app, spawn_gateway_binary, telemetry, wait_until};

const ASSETS: [(&str, &str); 3] = [
    ("/", "text/html"),
    ("/status.js", "text/javascript"),
    ("/status.css", "text/css"),
];

#[test]
fn the_page_and_its_assets_carry_a_strict_content_security_policy() {
    let app = spawn_app("");
    let mut total = 0;
    for (path, kind) in ASSETS {
        let r = app.get(path);
        assert_eq!(r.status, 200, "{path}");
        let h = |name: &str| r.headers.get(name).cloned().unwrap_or_default();
        assert!(
            h("content-type").starts_with(kind),
            "{path}: {}",
            h("content-type")
        );
        let csp = h("content-security-policy");
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'none'",
            "base-uri 'none'",
        ] {
            assert!(csp.contains(part), "{path}: CSP {csp:?} lacks {part:?}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(h("referrer-policy"), "no-referrer", "{path}");
        total += r.text.len();
    }
    // Everything comes from the binary, and it is small.
    assert!(total <= 100 * 1024, "the page weighs {total} bytes");
    let html = app.get("/").text;
    assert!(!html.contains("style="), "no inline style");
    assert!(!html.contains("<style"), "no inline style sheet");
    for tag in html.split("<script").skip(1) {
        let open = &tag[..tag.find('>').unwrap()];
        assert!(
            open.contains("src=\"/"),
            "only same-origin script files: {open}"
        );
    }
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN"
    );
}

#[test]
fn the_status_document_needs_the_admin_credentials() {
    let app = spawn_app("");
    let url = app.url("/admin/status");
    let none = request(ureq::get(&url), None);
    assert_eq!(none.status, 401);
    let wrong = request(
        ureq::get(&url).set("Authorization", "Bearer not-the-admin-token-at-all"),
        None,
    );
    assert_eq!(wrong.status, 401);
    for r in [&none, &wrong] {
        assert!(
            r.body["gateway"].is_null() && r.body["sinks"].is_null(),
            "{}",
            r.text
        );
        assert_eq!(r.body["error"]["code"], "unauthorized");
    }
    // The page itself is public: it holds no data, only the sign-in form.
    let page = app.get("/").text;
    assert!(page.contains("id=\"signin-form\""));
    assert!(!page.contains(&app.admin_token()));
    let ok = app.admin("GET", "/admin/status", None);
    assert_eq!(ok.status, 200, "{}", ok.text);
}

#[test]
fn the_status_document_shows_what_the_admin_api_shows() {
    let app = spawn_app("gateway_id = \"edge-status\"\n");
    for i in 0..3 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("s{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until("delivered", Duration::from_secs(10), || {
        app.admin("GET", "/admin/status", None).body["sinks"][0]["backlog"] == 0
    });
    let s = app.admin("GET", "/admin/status", None).body;
    assert_eq!(s["gateway"]["id"], "edge-status");
    assert_eq!(s["gateway"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["gateway"]["mqtt"]["state"], "disabled");
    let http = &s["ingest"]["sources"]["http"];
    assert_eq!(http["total"], 3);
    // The interval in progress counts the records at once.
    let points: u64 = http["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .sum();
    assert_eq!(points, 3, "{http}");
    assert!(s["wal"]["limit_bytes"].as_u64().unwrap() > 0);
    assert!(s["wal"]["bytes"].as_u64().unwrap() > 0);
    assert!(s["wal"]["disk_free_bytes"].as_u64().unwrap() > 0);
    assert!(s["wal"]["full_in_s"].is_null());

    // One row per sink, the same rows as GET /admin/sinks.
    let sinks = app.admin("GET", "/admin/sinks", None).body;
    let rows = s["sinks"].as_array().unwrap();
    assert_eq!(rows.len(), sinks.as_array().unwrap().len());
    for (row, admin) in rows.iter().zip(sinks.as_array().unwrap()) {
        assert_eq!(row["name"], admin["name"]);
        assert_eq!(row["condition"], admin["condition"]);
        assert_eq!(row["condition"], "up");
        assert_eq!(row["dead_letters"], admin["wal"]["dead"]);
        assert_eq!(row["backlog"], 0);
    }
    assert_eq!(s["dead_letters"]["total"], 0);

    // Paused through the admin API: the status says so, in a word.
    let p = app.admin("POST", "/admin/sinks/archive/pause", None);
    assert_eq!(p.status, 200, "{}", p.text);
    let s = app.admin("GET", "/admin/status", None).body;
    assert_eq!(s["sinks"][0]["condition"], "paused");
}

#[test]
fn gateway_status_prints_the_running_gateways_status_document() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let _gw = spawn_gateway_binary(&data, port, &["--mqtt-url", "off"], &[]);
    let addr = format!("127.0.0.1:{port}");
    let r = request(
        ureq::post(&format!("http://{addr}/ingest/dev-1")).set("Content-Type", "application/json"),
        Some(&telemetry("c1", 1.0)),
    );
    assert_eq!(r.status, 202);
    let d = data.to_str().unwrap();
    let (code, out, err) = gateway(
        &["--data-dir", d, "--http-addr", &addr, "--json", "status"],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ingest"]["sources"]["http"]["total"], 1);
    assert_eq!(v["sinks"][0]["name"], "archive");
    let (code, out, err) = gateway(&["--data-dir", d, "--http-addr", &addr, "status"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ingest http: 1 accepted"), "{out}");
    assert!(out.contains("archive"), "{out}");

    // Stopped: it says so and exits 1.
    drop(_gw);
    let (code, _, err) = gateway(&["--data-dir", d, "--http-addr", &addr, "status"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
}
