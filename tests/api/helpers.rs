//! `spawn_app()` and friends: every test gets its own gateway on port 0 with
//! its own temp data dir, running in its own actix system thread.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gateway::config::{Settings, SinkTarget};
use gateway::startup::{sink_factory, Application, Handles};
use gateway_actors::sink::SinkFactory;
use serde_json::Value;

pub struct TestApp {
    pub base: String,
    pub dir: tempfile::TempDir,
    #[allow(dead_code)] // for tests that talk to actors directly
    pub handles: Handles,
    system: actix::System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Settings for a test: `toml` on top of the defaults, in a fresh data dir.
pub fn test_settings(dir: &Path, toml: &str) -> Settings {
    let cfg = format!("data_dir = \"{}\"\n{toml}", dir.display());
    let mut s = Settings::from_toml(&cfg).expect("test settings");
    if !toml.contains("[mqtt]") {
        // Tests run in parallel: no embedded broker on the fixed default port.
        s.mqtt = gateway::config::MqttMode::Off;
    }
    s.http.addr = "127.0.0.1:0".parse().unwrap();
    s.http.workers = 1;
    s
}

pub fn spawn_app(toml: &str) -> TestApp {
    spawn_app_with(toml, |_, t| sink_factory(t))
}

pub fn spawn_app_with(
    toml: &str,
    make_sink: impl Fn(&str, &SinkTarget) -> SinkFactory + Send + 'static,
) -> TestApp {
    spawn_app_at(None, toml, make_sink)
}

/// Like [`spawn_app_with`] with the WAL in `data_dir` instead of the temp dir
/// (the temp dir still holds the default archive).
pub fn spawn_app_at(
    data_dir: Option<&Path>,
    toml: &str,
    make_sink: impl Fn(&str, &SinkTarget) -> SinkFactory + Send + 'static,
) -> TestApp {
    gateway::telemetry::init_test_logging("info");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path(), toml);
    if let Some(d) = data_dir {
        settings.data_dir = d.to_path_buf();
    }
    try_spawn(settings, make_sink)
        .map(|(base, handles, system, thread)| TestApp {
            base,
            dir,
            handles,
            system,
            thread: Some(thread),
        })
        .expect("application starts")
}

type Spawned = (String, Handles, actix::System, std::thread::JoinHandle<()>);

pub fn try_spawn(
    settings: Settings,
    make_sink: impl Fn(&str, &SinkTarget) -> SinkFactory + Send + 'static,
) -> Result<Spawned, String> {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let sys = actix::System::new();
        let started = sys.block_on(async move {
            let app = Application::build_with(settings, make_sink).await?;
            let out = (app.port(), app.handles.clone(), actix::System::current());
            actix::spawn(async move {
                let _ = app.run_until_stopped().await;
            });
            anyhow::Ok(out)
        });
        match started {
            Ok(out) => {
                let _ = tx.send(Ok(out));
                let _ = sys.run();
            }
            Err(e) => {
                let _ = tx.send(Err(format!("{e:#}")));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok((port, handles, system))) => {
            Ok((format!("http://127.0.0.1:{port}"), handles, system, thread))
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(e) => Err(format!("application did not start: {e}")),
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Value,
    pub text: String,
}

fn to_resp(r: ureq::Response) -> Resp {
    let status = r.status();
    let headers = r
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = r.header(&n).unwrap_or_default().to_string();
            (n.to_lowercase(), v)
        })
        .collect();
    let text = r.into_string().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

pub fn request(req: ureq::Request, body: Option<&str>) -> Resp {
    let res = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match res {
        Ok(r) => to_resp(r),
        Err(ureq::Error::Status(_, r)) => to_resp(r),
        Err(e) => panic!("request failed: {e}"),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn post_json(&self, device: &str, body: &str) -> Resp {
        request(
            ureq::post(&self.url(&format!("/ingest/{device}")))
                .set("Content-Type", "application/json"),
            Some(body),
        )
    }

    pub fn get(&self, path: &str) -> Resp {
        request(ureq::get(&self.url(path)), None)
    }

    /// The admin token the gateway created in its data dir.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.token"))
            .expect("the gateway created an admin token in its data dir")
            .trim()
            .to_string()
    }

    /// An admin API request with the admin token.
    pub fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let req = ureq::request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {}", self.admin_token()))
            .set("Content-Type", "application/json");
        request(req, body.map(|b| b.to_string()).as_deref())
    }

    pub fn archive_dir(&self) -> PathBuf {
        self.dir.path().join("archive")
    }

    /// One value of a metric line, e.g. `gateway_wal_records{sink="archive",state="dead"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.get("/metrics").text, series)
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

pub fn telemetry(msg_id: &str, t: f64) -> String {
    format!(
        r#"{{"msg_id":"{msg_id}","ts":"2026-11-25T08:00:00.123Z","metrics":{{"temperature_c":{t}}},"tags":{{"fw":"1.4.2"}}}}"#
    )
}

/// Every record in every `.ndjson.gz` object under `dir`.
/// The `idempotency_key`s of canonical records (archived, dumped from S3, …).
pub fn record_keys<'a>(records: impl IntoIterator<Item = &'a Value>) -> HashSet<String> {
    records
        .into_iter()
        .map(|r| r["idempotency_key"].as_str().unwrap().to_string())
        .collect()
}

/// The idempotency keys of every record archived under `dir`.
pub fn archived_keys(dir: &Path) -> HashSet<String> {
    record_keys(&archived_records(dir))
}

/// Every record of every object under `dir`, read while the gateway may be
/// merging objects (the archive's upkeep): a read during which the object
/// list changed is done again.
pub fn archived_records(dir: &Path) -> Vec<Value> {
    for _ in 0..50 {
        let before = archive_objects(dir);
        if let Some(records) = read_objects(&before) {
            if archive_objects(dir) == before {
                return records;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the archive under {} kept changing while it was read",
        dir.display()
    );
}

/// The `.ndjson.gz` objects under `dir`, sorted.
pub fn archive_objects(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".ndjson.gz") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The records of `objects`; `None` if one of them is gone.
fn read_objects(objects: &[PathBuf]) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    for p in objects {
        let f = match std::fs::File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("{}: {e}", p.display()),
        };
        let r = BufReader::new(flate2::read::MultiGzDecoder::new(f));
        for line in r.lines() {
            let line = line.unwrap();
            out.push(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad NDJSON line {line:?}: {e}")),
            );
        }
    }
    Some(out)
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { dir })
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Fills the disk with a file, leaving about `leave` bytes free.
    pub fn fill(&self, leave: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let free = fs_free(self.path());
        let len = free.saturating_sub(leave);
        std::fs::write(&filler, vec![0u8; len as usize]).unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

pub fn fs_free(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `gateway` child process, killed when dropped (a failed test must not
/// leave it running).
pub struct GatewayProcess(pub std::process::Child);

impl std::ops::Deref for GatewayProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for GatewayProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real `gateway` binary on `data` and `http_port` with `args`
/// (after `run`) and `env`, and waits until `/readyz` answers 200.
pub fn spawn_gateway_binary(
    data: &Path,
    http_port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> GatewayProcess {
    spawn_gateway_binary_logged(data, http_port, args, env, None)
}

/// [`spawn_gateway_binary`], with the log (level info) appended to `log` when given.
pub fn spawn_gateway_binary_logged(
    data: &Path,
    http_port: u16,
    args: &[&str],
    env: &[(&str, &str)],
    log: Option<&Path>,
) -> GatewayProcess {
    let stdout = match log {
        Some(p) => std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap(),
        ),
        None => std::process::Stdio::null(),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "run",
            "--log-level",
            if log.is_some() { "info" } else { "warn" },
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
        ])
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("GATEWAY_CONFIG")
        .envs(env.iter().copied())
        .stdout(stdout)
        .spawn()
        .expect("gateway binary starts");
    let child = GatewayProcess(child);
    let ready = format!("http://127.0.0.1:{http_port}/readyz");
    wait_until("gateway ready", Duration::from_secs(20), || {
        ureq::get(&ready)
            .timeout(Duration::from_secs(1))
            .call()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
    child
}

/// Runs `tests/support/{script}` with the test virtualenv's Python and
/// parses its stdout as JSON lines (the far-side readers: boto3, confluent-kafka).
#[allow(dead_code)] // used by the sink tests, not by the api tests
pub fn python_json_lines(script: &str, args: &[String]) -> Vec<Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join(".venv-test/bin/python"))
        .arg(root.join("tests/support").join(script))
        .args(args)
        .output()
        .expect(".venv-test exists (scripts/test-deps.sh)");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{script}: bad JSON line {l:?}: {e}"))
        })
        .collect()
}
