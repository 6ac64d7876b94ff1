//! `gateway fleet …`: the operator's side of the fleet channel (DESIGN §11),
//! in the gateway's own binary: make a signing key, sign a command, send
//! one and wait for the reply, read the fleet's retained states; `rollout`
//! is in [`crate::fleet_rollout`].
//!
//! `send` and `status` connect to the fleet broker through the same
//! [`MqttClient`] as the gateway (TLS, mTLS, credentials from files), with
//! a clean session of their own.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use gateway_actors::fleet::verify::SigningKey;
use gateway_actors::mqtt::client::{Event, MqttClient, PublishExtras};
use serde_json::Value;

use crate::cli::{FleetBroker, FleetCommand, FleetTarget};
use crate::fleet_client::connect_filters;

/// Runs a `gateway fleet` subcommand; `json`: machine-readable output.
pub fn run(cmd: &FleetCommand, json: bool) -> ExitCode {
    let res = match cmd {
        FleetCommand::Keygen { out, key_id } => keygen(out, key_id).map(|()| ExitCode::SUCCESS),
        FleetCommand::Sign {
            target,
            key,
            command,
            args,
        } => signed(target, key, command, args.as_deref()).map(|(_, env)| {
            println!("{env}");
            ExitCode::SUCCESS
        }),
        FleetCommand::Send {
            broker,
            target,
            key,
            command,
            args,
            timeout,
        } => send(broker, target, key, command, args.as_deref(), *timeout),
        FleetCommand::Status {
            broker,
            group,
            wait,
        } => status(broker, group.as_deref(), *wait, json),
        FleetCommand::Rollout {
            broker,
            group,
            bundle,
            key,
            waves,
            max_failures,
            timeout,
            wait,
        } => crate::fleet_rollout::run(
            broker,
            &crate::fleet_rollout::Plan {
                group: group.clone(),
                bundle: bundle.clone(),
                key: key.clone(),
                waves: waves.clone(),
                max_failures: *max_failures,
                timeout: *timeout,
                wait: *wait,
            },
            json,
        ),
    };
    res.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}

/// Writes `DIR/KEY_ID.key` (0600, never overwritten) and `DIR/KEY_ID.pub`,
/// and prints the public key line.
fn keygen(out: &Path, key_id: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let (private, public) = SigningKey::generate(key_id).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key_path = out.join(format!("{key_id}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                key_path.display()
            )
        })?;
    f.write_all(private.as_bytes())?;
    f.sync_all()?;
    let pub_path = out.join(format!("{key_id}.pub"));
    std::fs::write(&pub_path, format!("{public}\n"))
        .with_context(|| format!("writing {}", pub_path.display()))?;
    println!("{public}");
    eprintln!(
        "private key: {} (mode 0600: keep it with the operator, never on a gateway)\n\
         public key:  {} (append its line to each gateway's fleet.trusted_keys_file)",
        key_path.display(),
        pub_path.display()
    );
    Ok(())
}

impl FleetTarget {
    /// The envelope's `target` and the topic of `command`.
    fn resolve(&self, command: &str) -> anyhow::Result<(String, String)> {
        match (&self.gateway, &self.group) {
            (Some(id), None) => Ok((id.clone(), format!("fleet/{id}/control/{command}"))),
            (None, Some(g)) => Ok((
                format!("group/{g}"),
                format!("fleet/group/{g}/control/{command}"),
            )),
            _ => bail!("name one target: --gateway ID or --group GROUP"),
        }
    }
}

/// The command's topic and its signed envelope.
fn signed(
    target: &FleetTarget,
    key: &Path,
    command: &str,
    args: Option<&str>,
) -> anyhow::Result<(String, Value)> {
    if command.is_empty() || command.contains(['/', '+', '#']) {
        bail!("{command:?} is not a command name (ping, sink.pause, config.set…)");
    }
    let key = SigningKey::load(key).map_err(anyhow::Error::msg)?;
    let args: Value = match args {
        None => Value::Null,
        Some(a) => serde_json::from_str(a).with_context(|| format!("ARGS {a:?} is not JSON"))?,
    };
    let (target, topic) = target.resolve(command)?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let env = key.sign(
        &target,
        command,
        args,
        &request_id,
        chrono::Utc::now().timestamp_millis(),
    );
    Ok((topic, env))
}

/// A clean-session client of the fleet broker subscribed to `filter`.
fn connect(
    b: &FleetBroker,
    filter: String,
) -> anyhow::Result<(MqttClient, tokio::sync::mpsc::Receiver<Event>)> {
    connect_filters(b, vec![filter])
}

/// Publishes a signed command once the reply subscription is in place and
/// prints the replies: the first for a gateway (exit 0 when it is ok, 1
/// when not), every one until the timeout for a group (one line each,
/// `GATEWAY_ID REPLY`; exit 0 when at least one came and all are ok).
fn send(
    b: &FleetBroker,
    target: &FleetTarget,
    key: &Path,
    command: &str,
    args: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let (topic, env) = signed(target, key, command, args)?;
    let rid = env["request_id"].as_str().unwrap_or_default().to_string();
    let group = target.group.is_some();
    actix::System::new().block_on(async move {
        let (client, mut events) = connect(b, format!("fleet/+/reply/{rid}"))?;
        let deadline = actix_rt::time::sleep(timeout);
        tokio::pin!(deadline);
        let (mut sent, mut replies, mut all_ok, mut last_error) = (false, 0u32, true, None);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Event::Subscribed) if !sent => {
                        let body = bytes::Bytes::from(serde_json::to_vec(&env)?);
                        client.publish(topic.clone(), body, PublishExtras::default()).await.map_err(anyhow::Error::msg)?;
                        sent = true;
                    }
                    Some(Event::Message(m)) => {
                        let reply: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                        let ok = reply["ok"] == Value::Bool(true);
                        replies += 1;
                        all_ok &= ok;
                        if group {
                            let gw = m.topic.split('/').nth(1).unwrap_or("?");
                            println!("{gw} {reply}");
                        } else {
                            println!("{}", serde_json::to_string_pretty(&reply)?);
                            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                        }
                    }
                    Some(Event::Disconnected { error, .. }) => last_error = Some(error),
                    Some(_) => {}
                    None => bail!("the MQTT client stopped"),
                },
                _ = &mut deadline => break,
            }
        }
        if !sent {
            bail!(
                "cannot reach the fleet broker {} within {timeout:?}: {}",
                b.url,
                last_error.unwrap_or_else(|| "no answer".into())
            );
        }
        if replies == 0 {
            eprintln!("no reply within {timeout:?} (request {rid})");
            return Ok(ExitCode::FAILURE);
        }
        Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}

/// Reads the retained states for `wait` after subscribing and prints them
/// (a table, or a JSON array with `--json`), members of `group` only when given.
fn status(
    b: &FleetBroker,
    group: Option<&str>,
    wait: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let states = actix::System::new().block_on(async move {
        let (_client, mut events) = connect(b, "fleet/+/state".into())?;
        let mut states = std::collections::BTreeMap::new();
        // First the connection (at least 5 s), then `wait` after the SUBACK.
        let deadline = actix_rt::time::sleep(wait.max(Duration::from_secs(5)));
        tokio::pin!(deadline);
        let (mut subscribed, mut last_error) = (false, None);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Event::Subscribed) if !subscribed => {
                        subscribed = true;
                        deadline.as_mut().reset(actix_rt::time::Instant::now() + wait);
                    }
                    Some(Event::Message(m)) => {
                        if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                            states.insert(m.topic.clone(), v);
                        }
                    }
                    Some(Event::Disconnected { error, .. }) => last_error = Some(error),
                    Some(_) => {}
                    None => bail!("the MQTT client stopped"),
                },
                _ = &mut deadline => {
                    if subscribed {
                        break;
                    }
                    bail!(
                        "cannot reach the fleet broker {}: {}",
                        b.url,
                        last_error.unwrap_or_else(|| "no answer".into())
                    );
                }
            }
        }
        anyhow::Ok(states)
    })?;
    let members: Vec<Value> = states
        .into_values()
        .filter(|s| {
            group.is_none_or(|g| {
                s["groups"]
                    .as_array()
                    .is_some_and(|gs| gs.iter().any(|x| x == g))
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&members)?);
    } else {
        print!("{}", table(&members));
    }
    Ok(ExitCode::SUCCESS)
}

/// One row per gateway: the fields an operator scans first.
fn table(states: &[Value]) -> String {
    let mut rows = vec![[
        "GATEWAY", "ONLINE", "VERSION", "BUNDLE", "UPTIME", "INGEST/S", "WAL", "SINKS UP", "ISSUES",
    ]
    .map(String::from)];
    for s in states {
        let sinks = s["sinks"].as_object();
        let total = sinks.map_or(0, |m| m.len());
        let up = sinks.map_or(0, |m| m.values().filter(|v| v["up"] == true).count());
        let mut issues: Vec<String> = Vec::new();
        for (name, v) in sinks.into_iter().flatten() {
            if v["paused"] == true {
                issues.push(format!("{name} paused"));
            }
            if let Some(e) = v["last_error"].as_str() {
                issues.push(format!("{name}: {e}"));
            }
        }
        if s["wal"]["backpressure"] == true {
            issues.push("WAL backpressure".into());
        }
        let rate = s["ingest"]["http_per_s"].as_f64().unwrap_or(0.0)
            + s["ingest"]["mqtt_per_s"].as_f64().unwrap_or(0.0);
        let wal = match (s["wal"]["bytes"].as_u64(), s["wal"]["limit"].as_u64()) {
            (Some(b), Some(l)) if l > 0 => format!("{}%", b * 100 / l),
            _ => "-".into(),
        };
        let online = s["online"] == true;
        let text = |v: &Value| v.as_str().map_or("-".to_string(), str::to_string);
        rows.push([
            text(&s["gateway_id"]),
            if online { "yes" } else { "NO" }.into(),
            text(&s["version"]),
            text(&s["bundle"]["status"]),
            s["uptime_s"].as_u64().map_or("-".into(), |u| {
                humantime::format_duration(Duration::from_secs(u)).to_string()
            }),
            if online {
                format!("{rate:.1}")
            } else {
                "-".into()
            },
            wal,
            if online {
                format!("{up}/{total}")
            } else {
                "-".into()
            },
            if issues.is_empty() {
                "-".into()
            } else {
                issues.join("; ")
            },
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
