//! The real `gateway` binary with its stdout kept in a file (its JSON log),
//! and a real OTLP receiver (`oteltap` from the test virtualenv).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{free_port, wait_until, GatewayProcess};

/// A gateway process whose stdout goes to `log`.
pub struct LoggedGateway {
    pub process: GatewayProcess,
    pub log: PathBuf,
    pub base: String,
}

impl LoggedGateway {
    /// Runs `gateway run --config {config}` on a free port with `data` as
    /// data dir and `env` added, and waits until `/readyz` answers 200.
    pub fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> LoggedGateway {
        let cfg = dir.join("gateway.toml");
        std::fs::write(&cfg, config).unwrap();
        let port = free_port();
        let log = dir.join("gateway.stdout");
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .env_remove("GATEWAY_CONFIG")
            .env_remove("GATEWAY_LOG_LEVEL")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SDK_DISABLED")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("gateway binary starts");
        let g = LoggedGateway {
            process: GatewayProcess(child),
            log,
            base: format!("http://127.0.0.1:{port}"),
        };
        let ready = format!("{}/readyz", g.base);
        let start = Instant::now();
        loop {
            let answer = match ureq::get(&ready).timeout(Duration::from_secs(1)).call() {
                Ok(_) => return g,
                Err(ureq::Error::Status(_, r)) => r.into_string().unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "gateway not ready: {answer}\n{}",
                std::fs::read_to_string(&g.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM, then waits for a clean exit (graceful shutdown flushes traces).
    pub fn stop(&mut self) {
        let pid = self.process.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                assert!(status.success(), "gateway exited with {status}");
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "gateway did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every stdout line, parsed as JSON (panics on the first line that is not).
    pub fn log_lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log).unwrap();
        text.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l:?}"))
            })
            .collect()
    }
}

/// A real OTLP/HTTP protobuf receiver from the test virtualenv printing JSON
/// lines: `python -m oteltap --port P` (one line per span) or
/// `tests/support/otlp_resources.py P` (one line per export); killed on drop.
pub struct OtelTap {
    child: Child,
    pub port: u16,
    out: PathBuf,
}

impl Drop for OtelTap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OtelTap {
    pub fn start(dir: &Path) -> OtelTap {
        Self::spawn(dir, &["-m", "oteltap", "--port"])
    }

    /// `tests/support/otlp_resources.py`: prints each export's resource
    /// attributes and span names (oteltap prints spans only).
    pub fn start_resource_printer(dir: &Path) -> OtelTap {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/otlp_resources.py");
        Self::spawn(dir, &[script.to_str().unwrap()])
    }

    /// `python -u {args} PORT`, stdout to a file.
    fn spawn(dir: &Path, args: &[&str]) -> OtelTap {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let port = free_port();
        let out = dir.join(format!("otlp-receiver-{port}.out"));
        let child = Command::new(root.join(".venv-test/bin/python"))
            .arg("-u")
            .args(args)
            .arg(port.to_string())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("oteltap.err")).unwrap())
            .spawn()
            .expect(".venv-test has oteltap (scripts/test-deps.sh)");
        let tap = OtelTap { child, port, out };
        wait_until("oteltap listening", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        tap
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The JSON lines of its output so far.
    pub fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// The spans oteltap received so far.
    pub fn spans(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|v| v.get("spanId").is_some())
            .collect()
    }
}

/// A span attribute as a string (string or integer value).
pub fn attr(span: &Value, key: &str) -> Option<String> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .and_then(|a| {
            let v = &a["value"];
            v["stringValue"]
                .as_str()
                .or_else(|| v["intValue"].as_str())
                .map(str::to_string)
                .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
        })
}
