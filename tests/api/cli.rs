//! The `gateway` command line: config check/print, token new, version.

use std::process::Command;

pub fn gateway(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .env_remove("GATEWAY_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_names_the_bad_key_and_its_file_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[wal]\nretention = \"48h\"\n").unwrap();
    let (code, out, _) = gateway(&["config", "check", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("ok"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[wal]\nretention = \"forever\"\n").unwrap();
    let (code, _, err) = gateway(&["config", "check", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("`wal.retention`") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn an_invalid_environment_value_stops_start_up_naming_the_variable() {
    let (code, _, err) = gateway(&["run"], &[("GATEWAY_HTTP_ADDR", "not-an-address")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("`http.addr`") && err.contains("GATEWAY_HTTP_ADDR"),
        "{err}"
    );
    let (code, _, err) = gateway(&["run"], &[("GATEWAY_WAL_MAX_BYTES", "lots")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("environment") && err.to_lowercase().contains("wal_max_bytes"),
        "{err}"
    );
}

#[test]
fn config_print_merges_every_layer_refuses_unknown_keys_and_shows_the_default_sink() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "gateway_id = \"from-file\"\n[sinks.api]\nkind = \"http\"\nurl = \"http://a/b\"\ntoken = \"s3cr3t\"\n")
        .unwrap();
    // `token` is not a key of the http sink: the file is refused, naming it.
    let (code, _, err) = gateway(
        &["config", "print", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token"), "{err}");
    std::fs::write(
        &file,
        "gateway_id = \"from-file\"\n[http]\naddr = \"127.0.0.1:9000\"\n",
    )
    .unwrap();
    let (code, out, err) = gateway(
        &[
            "config",
            "print",
            "--config",
            file.to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:9100",
        ],
        &[("GATEWAY_ID", "from-env")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("gateway_id = \"from-env\""),
        "env beats the file: {out}"
    );
    assert!(
        out.contains("addr = \"127.0.0.1:9100\""),
        "the flag beats the file: {out}"
    );
    assert!(
        out.contains("[sinks.archive]"),
        "the default sink is shown: {out}"
    );
}

#[test]
fn token_new_prints_a_token_and_the_matching_tokens_file_line() {
    let (code, out, _) = gateway(&["token", "new", "dev-7"], &[]);
    assert_eq!(code, 0);
    let token = out.lines().find_map(|l| l.strip_prefix("token: ")).unwrap();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("tokens-file line: "))
        .unwrap();
    let (device, hash) = line.split_once(':').unwrap();
    assert_eq!(device, "dev-7");
    assert_eq!(hash, hex::encode(gateway::auth::hash_token(token)));
    let (code, _, _) = gateway(&["token", "new", "bad id"], &[]);
    assert_eq!(code, 2);
}

#[test]
fn version_names_the_build() {
    let (code, out, _) = gateway(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("gateway {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}
