//! `gateway fleet rollout`: a config bundle to a group, wave by wave
//! (DESIGN §11).
//!
//! 1. Read the retained states (`fleet/+/state`): the members are the
//!    online gateways of the group, in id order.
//! 2. Waves are cumulative sizes (`1,10%,50%,100%`: the first member, then
//!    up to 10 % of them, …). Each member of a wave gets its own signed
//!    `bundle.apply` on `fleet/{id}/control/bundle.apply`.
//! 3. A member is done when its state reports the bundle's version
//!    `active` (success) or `rolled_back` (failure), when it refuses the
//!    command (failure, with the reason), or after `--timeout` (failure).
//! 4. After a wave, more than `--max-failures` failures stop the rollout
//!    (exit 1); members of later waves are never sent anything.
//!
//! A fleet broker that restarts mid-rollout is survived: the client
//! reconnects (same backoff as the gateways), re-subscribes (retained
//! states, and the states the gateways publish when they reconnect, say
//! where each member is), and sends the command again, under a new request
//! id, to each pending member whose state does not show the bundle yet. A
//! duplicate is harmless: a member already on it answers `busy` (on
//! probation) or `stale_version` (kept), both ignored here, and its state
//! decides.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gateway_actors::fleet::verify::SigningKey;
use gateway_actors::mqtt::client::{Event, MqttClient, PublishExtras};
use serde_json::{json, Value};

use crate::cli::FleetBroker;
use crate::fleet_client::connect_filters;

/// What to roll out, to whom and how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The group.
    pub group: String,
    /// The bundle file (JSON `{version, settings}`).
    pub bundle: PathBuf,
    /// The signing key file.
    pub key: PathBuf,
    /// Cumulative wave sizes.
    pub waves: String,
    /// Failures tolerated before stopping.
    pub max_failures: usize,
    /// Per wave.
    pub timeout: Duration,
    /// Retained-state collection time.
    pub wait: Duration,
}

/// Replies that do not mean the member failed: it already has the bundle
/// (a command sent again after a reconnect).
const HARMLESS: [&str; 3] = ["busy", "stale_version", "replayed"];

/// Cumulative member counts of `spec` for `total` members (strictly
/// increasing, at most `total`).
pub fn parse_waves(spec: &str, total: usize) -> anyhow::Result<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n = match part.strip_suffix('%') {
            Some(p) => {
                let pct: f64 = p
                    .parse()
                    .with_context(|| format!("wave {part:?}: not a percentage"))?;
                if !(0.0..=100.0).contains(&pct) || pct == 0.0 {
                    bail!("wave {part:?}: a share must be above 0% and at most 100%");
                }
                ((pct / 100.0) * total as f64).ceil() as usize
            }
            None => part
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| {
                    format!("wave {part:?}: not a count above 0 or a share like 10%")
                })?,
        };
        let n = n.min(total);
        if out.last().is_none_or(|last| n > *last) {
            out.push(n);
        }
    }
    if out.is_empty() {
        bail!("--waves {spec:?} names no wave");
    }
    Ok(out)
}

/// One member's progress.
#[derive(Debug, Clone)]
struct Member {
    id: String,
    wave: usize,
    request_id: Option<String>,
    sent_at: Option<Instant>,
    result: Option<(bool, String, Duration)>,
}

/// Runs the rollout (see the module doc).
pub fn run(b: &FleetBroker, plan: &Plan, json: bool) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&plan.bundle)
        .with_context(|| format!("reading {}", plan.bundle.display()))?;
    let bundle: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", plan.bundle.display()))?;
    let version = bundle["version"]
        .as_u64()
        .filter(|v| *v > 0)
        .context("the bundle needs \"version\": an integer above 0")?;
    if !bundle["settings"].is_object() {
        bail!("the bundle needs \"settings\": an object");
    }
    let key = SigningKey::load(&plan.key).map_err(anyhow::Error::msg)?;
    actix::System::new().block_on(async move {
        let (client, events) =
            connect_filters(b, vec!["fleet/+/state".into(), "fleet/+/reply/+".into()])?;
        let mut r = Rollout {
            client,
            events,
            key,
            bundle,
            version,
            states: BTreeMap::new(),
            members: Vec::new(),
            connected: false,
            connects: 0,
            started: Instant::now(),
        };
        r.collect_states(b, plan.wait).await?;
        r.run_waves(plan, json).await
    })
}

struct Rollout {
    client: MqttClient,
    events: tokio::sync::mpsc::Receiver<Event>,
    key: SigningKey,
    bundle: Value,
    version: u64,
    /// gateway id → (its last state, when it arrived).
    states: BTreeMap<String, (Value, Instant)>,
    members: Vec<Member>,
    connected: bool,
    connects: u32,
    started: Instant,
}

impl Rollout {
    fn progress(&self, line: String) {
        eprintln!("[{:>6.1}s] {line}", self.started.elapsed().as_secs_f64());
    }

    /// Reads the retained states for `wait` after the subscription.
    async fn collect_states(&mut self, b: &FleetBroker, wait: Duration) -> anyhow::Result<()> {
        let deadline = actix_rt::time::sleep(wait.max(Duration::from_secs(10)));
        tokio::pin!(deadline);
        let (mut subscribed, mut last_error) = (false, None);
        loop {
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(Event::Subscribed) if !subscribed => {
                        subscribed = true;
                        deadline.as_mut().reset(actix_rt::time::Instant::now() + wait);
                    }
                    Some(Event::Disconnected { error, .. }) => {
                        self.connected = false;
                        last_error = Some(error);
                    }
                    Some(ev) => self.on_event(ev),
                    None => bail!("the MQTT client stopped"),
                },
                _ = &mut deadline => {
                    if subscribed {
                        return Ok(());
                    }
                    bail!(
                        "cannot reach the fleet broker {}: {}",
                        b.url,
                        last_error.unwrap_or_else(|| "no answer".into())
                    );
                }
            }
        }
    }

    /// Records a state or a reply.
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected { .. } => {
                self.connected = true;
                self.connects += 1;
            }
            Event::Message(m) => {
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    return;
                };
                let mut parts = m.topic.split('/');
                let (_, id, kind) = (parts.next(), parts.next(), parts.next());
                let Some(id) = id else { return };
                match kind {
                    Some("state") => {
                        self.states
                            .insert(id.to_string(), (v.clone(), Instant::now()));
                        self.judge_state(id, &v);
                    }
                    Some("reply") => self.judge_reply(id, &v),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn finish(&mut self, id: &str, ok: bool, what: String) {
        let Some(m) = self
            .members
            .iter_mut()
            .find(|m| m.id == id && m.result.is_none() && m.sent_at.is_some())
        else {
            return;
        };
        let took = m.sent_at.map(|t| t.elapsed()).unwrap_or_default();
        m.result = Some((ok, what.clone(), took));
        let wave = m.wave;
        self.progress(format!(
            "wave {wave}: {id} {what} after {:.1}s",
            took.as_secs_f64()
        ));
    }

    /// A state that reports this bundle settled, received after the
    /// command was sent, finishes the member.
    fn judge_state(&mut self, id: &str, v: &Value) {
        let bundle = &v["bundle"];
        if bundle["version"] != self.version {
            return;
        }
        match bundle["status"].as_str() {
            Some("active") => self.finish(id, true, "active".into()),
            Some("rolled_back") => {
                let reason = bundle["reason"].as_str().unwrap_or("no reason given");
                self.finish(id, false, format!("rolled_back ({reason})"));
            }
            _ => {}
        }
    }

    /// A refusal of the member's latest request finishes it (unless it
    /// only says the member already has the bundle).
    fn judge_reply(&mut self, id: &str, v: &Value) {
        let ours = self
            .members
            .iter()
            .any(|m| m.id == id && m.request_id.as_deref() == v["request_id"].as_str());
        if !ours || v["ok"] == true {
            return;
        }
        let code = v["error"].as_str().unwrap_or("error");
        if HARMLESS.contains(&code) {
            return;
        }
        let message = v["message"].as_str().unwrap_or_default();
        self.finish(id, false, format!("refused ({code}: {message})"));
    }

    /// Signs and publishes `bundle.apply` for member `i`.
    async fn send(&mut self, i: usize) {
        let id = self.members[i].id.clone();
        let rid = uuid::Uuid::new_v4().to_string();
        let env = self.key.sign(
            &id,
            "bundle.apply",
            self.bundle.clone(),
            &rid,
            chrono::Utc::now().timestamp_millis(),
        );
        let body = bytes::Bytes::from(serde_json::to_vec(&env).unwrap_or_default());
        let topic = format!("fleet/{id}/control/bundle.apply");
        match self
            .client
            .publish(topic, body, PublishExtras::default())
            .await
        {
            Ok(()) => {
                let m = &mut self.members[i];
                m.request_id = Some(rid);
                m.sent_at.get_or_insert_with(Instant::now);
            }
            Err(e) => self.progress(format!(
                "{id}: cannot send yet ({e}); will retry on reconnect"
            )),
        }
    }

    /// The state shows the member working on (or done with) this bundle.
    fn shows_bundle(&self, id: &str) -> bool {
        self.states
            .get(id)
            .is_some_and(|(v, _)| v["bundle"]["version"] == self.version)
    }

    async fn run_waves(&mut self, plan: &Plan, json: bool) -> anyhow::Result<ExitCode> {
        let mut ids: Vec<(String, bool)> = self
            .states
            .iter()
            .filter(|(_, (v, _))| {
                v["groups"]
                    .as_array()
                    .is_some_and(|gs| gs.iter().any(|g| g == plan.group.as_str()))
            })
            .map(|(id, (v, _))| (id.clone(), v["online"] == true))
            .collect();
        ids.sort();
        let offline: Vec<&str> = ids
            .iter()
            .filter(|(_, on)| !on)
            .map(|(id, _)| id.as_str())
            .collect();
        if !offline.is_empty() {
            self.progress(format!(
                "skipping {} offline member(s): {}",
                offline.len(),
                offline.join(", ")
            ));
        }
        let online: Vec<String> = ids
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(id, _)| id)
            .collect();
        if online.is_empty() {
            bail!(
                "no online member of group {:?} on the fleet broker",
                plan.group
            );
        }
        let waves = parse_waves(&plan.waves, online.len())?;
        let mut from = 0;
        for (w, upto) in waves.iter().enumerate() {
            for id in &online[from..*upto] {
                self.members.push(Member {
                    id: id.clone(),
                    wave: w + 1,
                    request_id: None,
                    sent_at: None,
                    result: None,
                });
            }
            from = *upto;
        }
        self.progress(format!(
            "bundle {} to {} member(s) of {:?} in {} wave(s) {:?}, stopping above {} failure(s)",
            self.version,
            online.len(),
            plan.group,
            waves.len(),
            waves,
            plan.max_failures
        ));
        let mut stopped = false;
        for w in 1..=waves.len() {
            let idx: Vec<usize> = (0..self.members.len())
                .filter(|i| self.members[*i].wave == w)
                .collect();
            self.progress(format!(
                "wave {w}/{}: sending to {}",
                waves.len(),
                idx.iter()
                    .map(|i| self.members[*i].id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            for &i in &idx {
                let already = self.states.get(&self.members[i].id).is_some_and(|(v, _)| {
                    v["bundle"]["active"] == self.version && v["bundle"]["status"] == "active"
                });
                if already {
                    self.members[i].sent_at = Some(Instant::now());
                    let id = self.members[i].id.clone();
                    self.finish(&id, true, "active (already)".into());
                } else {
                    self.send(i).await;
                }
            }
            self.wait_wave(w, &idx, plan.timeout).await?;
            let failures = self
                .members
                .iter()
                .filter(|m| m.result.as_ref().is_some_and(|r| !r.0))
                .count();
            self.progress(format!(
                "wave {w}/{} done: {failures} failure(s) so far",
                waves.len()
            ));
            if failures > plan.max_failures {
                self.progress(format!(
                    "stopping: {failures} failure(s) > --max-failures {}",
                    plan.max_failures
                ));
                stopped = true;
                break;
            }
        }
        self.report(json);
        Ok(if stopped {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }

    /// Waits until every member of wave `w` is done or `timeout` passed;
    /// resends after a reconnect.
    async fn wait_wave(
        &mut self,
        w: usize,
        idx: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut seen_connects = self.connects;
        while idx.iter().any(|i| self.members[*i].result.is_none()) {
            if Instant::now() >= deadline {
                for &i in idx {
                    if self.members[i].result.is_none() {
                        let id = self.members[i].id.clone();
                        self.members[i].sent_at.get_or_insert_with(Instant::now);
                        self.finish(&id, false, format!("timeout ({}s)", timeout.as_secs()));
                    }
                }
                break;
            }
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(Event::Disconnected { error, .. }) => {
                        if self.connected {
                            self.progress(format!("fleet broker disconnected ({error}); reconnecting"));
                        }
                        self.connected = false;
                    }
                    Some(ev) => self.on_event(ev),
                    None => bail!("the MQTT client stopped"),
                },
                _ = actix_rt::time::sleep(Duration::from_millis(500)) => {}
            }
            if self.connects != seen_connects && self.connected {
                seen_connects = self.connects;
                // Give the retained states a moment to arrive, then resend
                // to whoever does not show the bundle.
                self.progress(format!("wave {w}: fleet broker reconnected"));
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    tokio::select! {
                        ev = self.events.recv() => match ev {
                            Some(ev) => self.on_event(ev),
                            None => bail!("the MQTT client stopped"),
                        },
                        _ = actix_rt::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                for &i in idx {
                    let m = &self.members[i];
                    if m.result.is_none() && !self.shows_bundle(&m.id) {
                        let id = m.id.clone();
                        self.progress(format!("wave {w}: sending to {id} again"));
                        self.send(i).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// The final table (or JSON lines).
    fn report(&self, json: bool) {
        let rows: Vec<(String, String, String, String)> = self
            .members
            .iter()
            .map(|m| {
                let (result, secs) = match &m.result {
                    Some((_, what, took)) => (what.clone(), format!("{:.1}", took.as_secs_f64())),
                    None => ("not sent".to_string(), "-".to_string()),
                };
                (m.id.clone(), m.wave.to_string(), result, secs)
            })
            .collect();
        if json {
            for (m, (id, wave, result, secs)) in self.members.iter().zip(&rows) {
                let ok = m.result.as_ref().map(|r| r.0);
                println!(
                    "{}",
                    json!({"member": id, "wave": wave.parse::<u64>().unwrap_or(0), "result": result,
                           "ok": ok, "seconds": secs.parse::<f64>().ok()})
                );
            }
            return;
        }
        let header = (
            "MEMBER".to_string(),
            "WAVE".to_string(),
            "RESULT".to_string(),
            "SECONDS".to_string(),
        );
        let all: Vec<&(String, String, String, String)> =
            std::iter::once(&header).chain(rows.iter()).collect();
        let w0 = all.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = all.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let w2 = all.iter().map(|r| r.2.chars().count()).max().unwrap_or(0);
        for (a, b, c, d) in all {
            println!("{a:<w0$}  {b:<w1$}  {c:<w2$}  {d}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_waves;

    #[test]
    fn waves_are_cumulative_counts_or_shares_rounded_up_and_never_empty() {
        assert_eq!(
            parse_waves("1,10%,50%,100%", 50).unwrap(),
            vec![1, 5, 25, 50]
        );
        assert_eq!(parse_waves("1,10%,50%,100%", 5).unwrap(), vec![1, 3, 5]);
        assert_eq!(parse_waves("1,10%,50%,100%", 1).unwrap(), vec![1]);
        assert_eq!(parse_waves("2,100", 5).unwrap(), vec![2, 5]);
        assert!(parse_waves("0", 5).is_err());
        assert!(parse_waves("150%", 5).is_err());
        assert!(parse_waves("", 5).is_err());
    }
}
