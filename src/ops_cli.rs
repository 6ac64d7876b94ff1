//! The operator subcommands of the CLI (`gateway dlq …`, `replay`, `wal …`,
//! `sink …`, `config get|set`, `device-send`, `ping`, `status`).
//!
//! Each builds one control-plane command (name + JSON arguments) and runs it
//! where it is safe:
//! - **gateway stopped** (the data-dir lock is free): the CLI takes the lock,
//!   opens the WAL itself and runs the command through the same `Operator`
//!   the gateway uses;
//! - **gateway running** (the lock is held): the command goes to the running
//!   gateway's admin API (`POST /admin/commands/{name}`), which runs it on
//!   its WAL writer thread. The CLI never writes to a live WAL.
//! - **`--admin-url`** given: always that admin API (a remote gateway too),
//!   with the admin token or an admin client certificate.
//!
//! `status` reads a running gateway's `GET /admin/status`, the document the
//! status page shows (its rates and connections exist only while it runs).
//!
//! `dlq export` only reads: it streams from a read-only SQLite connection in
//! both cases (SQLite's own locking keeps that safe beside a live writer).
//!
//! How results are printed for people (and the progress line) is
//! `ops_cli/show.rs`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor as _;
use gateway_actors::control::ops::{bits_by_name, route_test, RouteTestContext};
use gateway_actors::control::{Command, OpError, Operator, RuntimeOverrides};
use gateway_actors::wal::{
    integrity_report, now_ms, parse_time_ms, DlqFilter, Wal, WalHealth, WalReader, WalStore,
    WalWriter,
};
use gateway_actors::{Metrics, Secret};
use serde_json::{json, Value};

use crate::cli::{
    Cli, Command as CliCommand, ConfigCommand, DlqCommand, DlqFilterArgs, RouteCommand,
    SinkCommand, WalCommand,
};
use crate::config::{Loaded, Settings};
use crate::lock::{try_lock, LockState};

mod show;

use show::{present, show_status, Progress, Show};

/// Exit status when `wal check` leaves problems.
const EXIT_PROBLEMS: u8 = 3;
/// Exit status when `--wait` sees no progress.
const EXIT_STALLED: u8 = 4;

/// Where a command runs.
enum Target {
    /// The gateway is stopped: we hold the data dir.
    Offline {
        /// Held until the command is done.
        _lock: crate::lock::DataDirLock,
    },
    /// The gateway runs: its admin API.
    Live(AdminClient),
}

/// How to reach an admin API: one HTTP client for every call.
struct AdminClient {
    base: String,
    /// Bearer token; `None` when a client certificate identifies us.
    token: Option<Secret>,
    client: reqwest::Client,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

/// A time from the command line: RFC 3339, epoch ms, or a duration ago.
pub fn parse_cli_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = parse_time_ms(&Value::String(s.to_string())) {
        return Ok(ms);
    }
    humantime::parse_duration(s)
        .map(|d| now_ms() - d.as_millis() as i64)
        .map_err(|_| {
            format!(
                "{s:?} is not a time: use RFC 3339, epoch milliseconds or a duration ago like 30m"
            )
        })
}

fn filter_json(f: &DlqFilterArgs) -> Result<serde_json::Map<String, Value>, String> {
    let mut m = serde_json::Map::new();
    if let Some(s) = &f.sink {
        m.insert("sink".into(), json!(s));
    }
    if let Some(d) = &f.device {
        m.insert("device".into(), json!(d));
    }
    if let Some(t) = &f.since {
        m.insert("since".into(), json!(parse_cli_time(t)?));
    }
    if let Some(t) = &f.until {
        m.insert("until".into(), json!(parse_cli_time(t)?));
    }
    if let Some(e) = &f.error {
        m.insert("error".into(), json!(e));
    }
    Ok(m)
}

/// A config value from the command line: JSON, or a bare word as a string.
fn cli_value(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

/// The command for a CLI subcommand: (name, args, how to show, wait for sink).
type Request = (&'static str, Value, Show, Option<Option<String>>);

fn request(cmd: &CliCommand) -> Result<Option<Request>, String> {
    Ok(Some(match cmd {
        CliCommand::Ping => ("ping", json!({}), Show::Json, None),
        CliCommand::Config(ConfigCommand::Get) => ("config.get", json!({}), Show::Json, None),
        CliCommand::Config(ConfigCommand::Set { key, value }) => (
            "config.set",
            json!({"key": key, "value": cli_value(value)}),
            Show::Json,
            None,
        ),
        CliCommand::DeviceSend { device, payload } => {
            let p: Value = serde_json::from_str(payload)
                .map_err(|e| format!("the payload must be JSON: {e}"))?;
            (
                "device.send",
                json!({"device_id": device, "payload": p}),
                Show::Json,
                None,
            )
        }
        CliCommand::Dlq(DlqCommand::List {
            filter,
            limit,
            after_seq,
        }) => {
            let mut m = filter_json(filter)?;
            m.insert("limit".into(), json!(limit));
            if let Some(a) = after_seq {
                m.insert("after_seq".into(), json!(a));
            }
            ("dlq.list", Value::Object(m), Show::DlqList, None)
        }
        CliCommand::Dlq(DlqCommand::Requeue { filter, wait }) => (
            "dlq.requeue",
            Value::Object(filter_json(filter)?),
            Show::Json,
            wait.then(|| filter.sink.clone()),
        ),
        CliCommand::Dlq(DlqCommand::Purge { filter }) => (
            "dlq.purge",
            Value::Object(filter_json(filter)?),
            Show::Json,
            None,
        ),
        CliCommand::Replay {
            sink,
            since,
            until,
            wait,
        } => {
            let since = parse_cli_time(since)?;
            let until = match until {
                Some(u) => parse_cli_time(u)?,
                None => now_ms() + 1,
            };
            (
                "replay",
                json!({"sink": sink, "since": since, "until": until}),
                Show::Json,
                wait.then(|| Some(sink.clone())),
            )
        }
        CliCommand::Wal(WalCommand::Stats) => ("wal.stats", json!({}), Show::WalStats, None),
        CliCommand::Wal(WalCommand::Check { repair }) => {
            ("wal.check", json!({"repair": repair}), Show::WalCheck, None)
        }
        CliCommand::Wal(WalCommand::Compact) => ("wal.compact", json!({}), Show::Json, None),
        CliCommand::Sink(SinkCommand::List) => ("sinks.list", json!({}), Show::Sinks, None),
        CliCommand::Sink(SinkCommand::Pause { name }) => {
            ("sink.pause", json!({"sink": name}), Show::Json, None)
        }
        CliCommand::Sink(SinkCommand::Resume { name }) => {
            ("sink.resume", json!({"sink": name}), Show::Json, None)
        }
        CliCommand::Route(RouteCommand::Test {
            device,
            payload,
            source,
            topic,
        }) => {
            let p: Value = serde_json::from_str(payload)
                .map_err(|e| format!("the payload must be JSON: {e}"))?;
            (
                "route.test",
                json!({"device_id": device, "payload": p, "source": source, "topic": topic}),
                Show::Json,
                None,
            )
        }
        _ => return Ok(None),
    }))
}

/// Runs an operator subcommand; `None` when `cmd` is not one.
pub fn run(cli: &Cli, cmd: &CliCommand) -> Option<ExitCode> {
    let settings =
        match Loaded::load(cli.config.as_deref(), true, &cli.flags()).and_then(|l| l.settings()) {
            Ok(s) => s,
            Err(e) => return Some(fail(format!("configuration: {e}"), 2)),
        };
    if let CliCommand::Dlq(DlqCommand::Export { filter, output }) = cmd {
        return Some(export(&settings, filter, output.as_ref()));
    }
    if let CliCommand::Status = cmd {
        return Some(status(cli, &settings));
    }
    let (name, args, show, wait) = match request(cmd) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => return Some(fail(e, 2)),
    };
    let target = match target(cli, &settings) {
        Ok(t) => t,
        Err(e) => return Some(fail(e, 1)),
    };
    let live = matches!(target, Target::Live(_));
    let system = actix::System::new();
    let result = system.block_on(execute(&settings, &target, name, args));
    let value = match result {
        Ok(v) => v,
        Err(e) => return Some(fail(e, 1)),
    };
    let mut code = present(&value, show, cli.json);
    if let (Some(sink), Target::Live(_)) = (&wait, &target) {
        code = system.block_on(wait_for_sink(&target, sink.as_deref()));
    } else if wait.is_some() && !live {
        eprintln!("note: the gateway is stopped; the records are delivered when it starts");
    }
    drop(target);
    Some(code)
}

fn target(cli: &Cli, settings: &Settings) -> Result<Target, String> {
    let identity = cli.admin_cert_file.clone().zip(cli.admin_key_file.clone());
    let token_path = crate::auth::admin_token_path(settings);
    let base = match &cli.admin_url {
        // An explicit API: that gateway, wherever it runs.
        Some(url) => url.trim_end_matches('/').to_string(),
        None => match try_lock(&settings.data_dir)
            .map_err(|e| format!("cannot lock {}: {e}", settings.data_dir.display()))?
        {
            LockState::Acquired(lock) => return Ok(Target::Offline { _lock: lock }),
            // The local gateway runs: its admin API.
            LockState::Held(_) => local_admin_url(settings),
        },
    };
    let token = match gateway_actors::secret::read_secret_file(&token_path) {
        Ok(t) => Some(t),
        Err(_) if identity.is_some() => None,
        Err(e) => {
            return Err(format!(
            "the admin token {} cannot be read: {e} (or give --admin-cert-file/--admin-key-file)",
            token_path.display()
        ))
        }
    };
    AdminClient::new(base, token, cli.admin_ca_file.as_ref(), identity.as_ref()).map(Target::Live)
}

/// The local gateway's base URL (admin API, health check), from
/// `http.addr` and `http.tls_*`.
pub fn local_admin_url(settings: &Settings) -> String {
    let addr = settings.http.addr;
    let tls = settings.http.tls.is_some();
    let host = if addr.ip().is_unspecified() || addr.ip().is_loopback() {
        // The dev certificate names localhost; plain HTTP takes the address.
        if tls {
            "localhost".to_string()
        } else {
            "127.0.0.1".to_string()
        }
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!(
        "{}://{host}:{}",
        if tls { "https" } else { "http" },
        addr.port()
    )
}

async fn execute(
    settings: &Settings,
    target: &Target,
    name: &str,
    args: Value,
) -> Result<Value, String> {
    match target {
        Target::Offline { .. } => offline(settings, name, args)
            .await
            .map_err(|e| format!("{} ({})", e, e.code())),
        Target::Live(client) => client.call(name, args).await,
    }
}

async fn offline(settings: &Settings, name: &str, args: Value) -> Result<Value, OpError> {
    let cmd = Command::parse(name, args)?;
    if let Command::RouteTest {
        device_id,
        payload,
        source,
        topic,
    } = cmd
    {
        // Needs no WAL: the rules in force (configuration + runtime.json).
        let runtime = RuntimeOverrides::load(&settings.data_dir).map_err(OpError::BadRequest)?;
        let policies = crate::startup::base_policies(settings);
        let routing = runtime.routing(&settings.priority, &policies, &bits_by_name(&policies));
        let topics = settings
            .mqtt
            .ingest()
            .map(|c| c.topics.clone())
            .unwrap_or_default();
        let cx = RouteTestContext {
            gateway_id: &settings.gateway_id,
            routing: &routing,
            topics: &topics,
            limits: &settings.ingest.limits,
        };
        return route_test(&cx, device_id, payload, source, topic);
    }
    let cfg = settings.wal_config();
    if !cfg.path.exists() {
        return Err(OpError::BadRequest(format!(
            "no WAL at {}: nothing to operate on (is data_dir right?)",
            cfg.path.display()
        )));
    }
    let path = cfg.path.clone();
    let wal = match Wal::open(cfg) {
        Ok(w) => w,
        Err(e) if matches!(cmd, Command::WalCheck { .. }) => {
            return Ok(serde_json::to_value(integrity_report(&path, &e)).unwrap_or_default());
        }
        Err(e) => return Err(OpError::from(e)),
    };
    let metrics = Metrics::unregistered();
    let health = Arc::new(WalHealth::default());
    let store = WalStore::new(wal, metrics.clone(), health.clone()).start();
    let writer = WalWriter::new(store, health);
    let reader = WalReader::open(&path, 2)?;
    let runtime = RuntimeOverrides::load(&settings.data_dir).map_err(OpError::BadRequest)?;
    let operator = Operator::new(crate::startup::operator_parts(
        settings,
        writer,
        reader,
        None,
        &[],
        runtime,
        metrics,
    ));
    let (command, args) = (cmd.name(), format!("{cmd:?}"));
    let result = operator.execute(cmd, "cli").await;
    audit_offline(settings, command, &args, &result);
    result
}

/// The gateway's audit log is its stdout; with the gateway stopped, the CLI
/// appends its actions to `{data_dir}/audit.log` (JSON lines) instead.
fn audit_offline(settings: &Settings, command: &str, args: &str, result: &Result<Value, OpError>) {
    let who = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        // SAFETY: getuid has no preconditions and cannot fail.
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }));
    let line = json!({
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "target": "audit",
        "actor": format!("cli:{who}"),
        "command": command,
        "args": args,
        "outcome": if result.is_ok() { "ok" } else { "error" },
        "error": result.as_ref().err().map(|e| e.to_string()),
    });
    let path = settings.data_dir.join("audit.log");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("warning: cannot append to {}: {e}", path.display());
    }
}

impl AdminClient {
    /// A client trusting `ca` (else the system roots) and presenting
    /// `identity` (certificate, PKCS#8 key), both PEM files.
    fn new(
        base: String,
        token: Option<Secret>,
        ca: Option<&PathBuf>,
        identity: Option<&(PathBuf, PathBuf)>,
    ) -> Result<Self, String> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(600));
        if let Some(ca) = ca {
            let cert = reqwest::Certificate::from_pem(&read(ca)?)
                .map_err(|e| format!("{}: not a PEM certificate: {e}", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        if let Some((cert, key)) = identity {
            let id = reqwest::Identity::from_pkcs8_pem(&read(cert)?, &read(key)?).map_err(|e| {
                format!("admin client certificate (the key must be PKCS#8 PEM): {e}")
            })?;
            b = b.identity(id);
        }
        let client = b.build().map_err(|e| e.to_string())?;
        Ok(Self {
            base,
            token,
            client,
        })
    }

    /// `POST /admin/commands/{name}` with `args`; the result, or the error message.
    async fn call(&self, name: &str, args: Value) -> Result<Value, String> {
        let url = format!("{}/admin/commands/{name}", self.base);
        let req = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(args.to_string());
        self.send(req, &url).await
    }

    /// `GET {path}` of the admin API; the JSON body, or the error message.
    async fn get(&self, path: &str) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        self.send(self.client.get(&url), &url).await
    }

    async fn send(&self, mut req: reqwest::RequestBuilder, url: &str) -> Result<Value, String> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(body)
        } else {
            let msg = body["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            Err(format!(
                "{msg} (HTTP {status}, {})",
                body["error"]["code"].as_str().unwrap_or("?")
            ))
        }
    }
}

/// `gateway status`: a running gateway's `GET /admin/status`, as text or
/// (`--json`) the document itself.
fn status(cli: &Cli, settings: &Settings) -> ExitCode {
    let client = match target(cli, settings) {
        Ok(Target::Live(c)) => c,
        Ok(Target::Offline { .. }) => {
            return fail(
                format!(
                    "the gateway on {} is not running; `gateway status` reads a running one \
                     (for the stored state: `gateway wal stats`, `gateway sink list`)",
                    settings.data_dir.display()
                ),
                1,
            )
        }
        Err(e) => return fail(e, 1),
    };
    let system = actix::System::new();
    match system.block_on(client.get("/admin/status")) {
        Ok(v) if cli.json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            show_status(&v);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

/// Polls the running gateway until `sink` (or every sink) has nothing
/// pending, showing delivery progress.
async fn wait_for_sink(target: &Target, sink: Option<&str>) -> ExitCode {
    let Target::Live(client) = target else {
        return ExitCode::SUCCESS;
    };
    let pending = |v: &Value| -> u64 {
        v["sinks"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(n, _)| sink.is_none_or(|s| s == n.as_str()))
                    .map(|(_, s)| {
                        s["enqueued"].as_u64().unwrap_or(0) + s["inflight"].as_u64().unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut progress = Progress::new();
    let mut first = None;
    let mut best = u64::MAX;
    let mut since_progress = Instant::now();
    loop {
        let v = match client.call("wal.stats", json!({})).await {
            Ok(v) => v,
            Err(e) => return fail(e, 1),
        };
        let p = pending(&v);
        let total = *first.get_or_insert(p);
        if p < best {
            best = p;
            since_progress = Instant::now();
        }
        progress.show(total.saturating_sub(p), total, "delivered", p == 0);
        if p == 0 {
            return ExitCode::SUCCESS;
        }
        if since_progress.elapsed() > Duration::from_secs(60) {
            return fail(
                format!("{p} record(s) still pending after a minute without progress: is the sink down? (gateway sink list)"),
                EXIT_STALLED,
            );
        }
        actix_rt::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `gateway dlq export`: NDJSON from a read-only connection.
fn export(settings: &Settings, filter: &DlqFilterArgs, output: Option<&PathBuf>) -> ExitCode {
    let f: DlqFilter = match filter_json(filter)
        .and_then(|m| serde_json::from_value(Value::Object(m)).map_err(|e| e.to_string()))
    {
        Ok(f) => f,
        Err(e) => return fail(e, 2),
    };
    let path = settings.wal_config().path;
    let reader = match WalReader::open(&path, 1) {
        Ok(r) => r,
        Err(e) => return fail(e, 1),
    };
    let total = match reader.count_dead(&f) {
        Ok(n) => n,
        Err(e) => return fail(e, 1),
    };
    let file;
    let mut out: Box<dyn std::io::Write> = match output {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => {
                file = f;
                Box::new(std::io::BufWriter::with_capacity(1 << 16, &file))
            }
            Err(e) => return fail(format!("{}: {e}", p.display()), 1),
        },
        None => Box::new(std::io::BufWriter::with_capacity(
            1 << 16,
            std::io::stdout().lock(),
        )),
    };
    let mut progress = Progress::new();
    let n = match reader.export_ndjson(&f, &mut out, |n| {
        progress.show(n, total, "dead letters exported", false)
    }) {
        Ok(n) => n,
        Err(e) => return fail(e, 1),
    };
    drop(out);
    if let Some(p) = output {
        if let Err(e) = std::fs::File::open(p).and_then(|f| f.sync_all()) {
            return fail(format!("{}: {e}", p.display()), 1);
        }
    }
    progress.show(n, total, "dead letters exported", true);
    ExitCode::SUCCESS
}
