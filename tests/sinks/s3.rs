//! The `s3` sink against moto, read back with boto3.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{free_port, python_json_lines, record_keys, spawn_app, telemetry, wait_until};

fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test")
}

/// A moto S3 server on a free port; killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new(venv().join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is installed in .venv-test (scripts/deps.sh test)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_bucket(&self, name: &str) {
        // moto does not check signatures: a plain CreateBucket request will do.
        ureq::put(&format!("{}/{name}", self.endpoint()))
            .call()
            .expect("create bucket");
    }

    /// (key, etag, record) of every record in every object, read with boto3.
    pub fn dump(&self, bucket: &str) -> Vec<(String, String, Value)> {
        python_json_lines("s3_dump.py", &[self.endpoint(), bucket.to_string()])
            .into_iter()
            .map(|v| {
                (
                    v["key"].as_str().unwrap().to_string(),
                    v["etag"].as_str().unwrap().to_string(),
                    v["record"].clone(),
                )
            })
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_sink_toml(moto: &Moto, creds: &std::path::Path, extra: &str) -> String {
    std::fs::write(creds.join("id"), "test\n").unwrap();
    std::fs::write(creds.join("secret"), "test\n").unwrap();
    format!(
        "gateway_id = \"edge-s3\"\n[sinks.lake]\nkind = \"s3\"\nurl = \"s3://telemetry/edge/raw\"\nendpoint = \"{}\"\n\
         access_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n{extra}",
        moto.endpoint(),
        creds.join("id").display(),
        creds.join("secret").display()
    )
}

#[test]
fn the_s3_sink_writes_every_record_as_gzip_ndjson_objects_keyed_by_seq_range() {
    let moto = Moto::start();
    moto.create_bucket("telemetry");
    let creds = tempfile::tempdir().unwrap();
    let app = spawn_app(&s3_sink_toml(
        &moto,
        creds.path(),
        "batch_max_records = 50\nbatch_max_wait_ms = 50\n",
    ));
    for b in 0..4 {
        let batch: Vec<String> = (0..30)
            .map(|i| telemetry(&format!("b{b}-{i}"), i as f64))
            .collect();
        let r = app.post_json("dev-1", &format!("[{}]", batch.join(",")));
        assert_eq!(r.status, 202, "{}", r.text);
    }
    wait_until("120 records in S3", Duration::from_secs(20), || {
        record_keys(moto.dump("telemetry").iter().map(|(_, _, r)| r)).len() == 120
    });
    let dump = moto.dump("telemetry");
    let pattern = regex_lite_key();
    for (key, _, rec) in &dump {
        let (first, last) = pattern(key).unwrap_or_else(|| panic!("unexpected object key {key}"));
        let seq = rec["seq"].as_u64().unwrap();
        assert!(first <= seq && seq <= last, "seq {seq} outside {key}");
        assert_eq!(rec["gateway_id"], "edge-s3");
    }
    assert!(app.metric(r#"gateway_sink_records_total{outcome="ok",sink="lake"}"#) >= 120.0);
}

/// Parses `edge/raw/dt=YYYY-MM-DD/hour=HH/edge-s3-{first}-{last}.ndjson.gz`.
fn regex_lite_key() -> impl Fn(&str) -> Option<(u64, u64)> {
    |key: &str| {
        let rest = key.strip_prefix("edge/raw/dt=")?;
        let (date, rest) = rest.split_once("/hour=")?;
        if date.len() != 10 {
            return None;
        }
        let (hour, name) = rest.split_once('/')?;
        if hour.len() != 2 {
            return None;
        }
        let seqs = name.strip_prefix("edge-s3-")?.strip_suffix(".ndjson.gz")?;
        let (a, b) = seqs.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

#[test]
fn a_large_batch_is_uploaded_in_parts() {
    let moto = Moto::start();
    moto.create_bucket("telemetry");
    let creds = tempfile::tempdir().unwrap();
    // No compression and a 5 MiB threshold: 20,000 records (~6 MB) need a multipart upload.
    let app = spawn_app(&format!(
        "{}\n[ingest]\nmax_payload_bytes = 16777216\n",
        s3_sink_toml(
            &moto,
            creds.path(),
            "gzip_level = 0\nbatch_max_records = 20000\nbatch_max_wait_ms = 10000\nmultipart_threshold_bytes = 5242880\n"
        )
    ));
    for b in 0..20 {
        let batch: Vec<String> = (0..1000)
            .map(|i| telemetry(&format!("m{b}-{i}"), i as f64))
            .collect();
        assert_eq!(
            app.post_json("dev-1", &format!("[{}]", batch.join(",")))
                .status,
            202
        );
    }
    wait_until("the big object", Duration::from_secs(60), || {
        moto.dump("telemetry").len() == 20_000
    });
    let dump = moto.dump("telemetry");
    let objects: std::collections::HashSet<(&str, &str)> = dump
        .iter()
        .map(|(k, e, _)| (k.as_str(), e.as_str()))
        .collect();
    assert_eq!(objects.len(), 1, "one batch, one object");
    let etag = objects.iter().next().unwrap().1;
    assert!(
        etag.contains('-'),
        "a multipart upload's ETag ends in -<parts>: {etag}"
    );
}
