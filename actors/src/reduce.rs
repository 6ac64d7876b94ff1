//! Report-by-exception for one sink (DESIGN §6b, `[sinks.NAME.reduce]`):
//! what the sink sends is a reduction of what it was given; the WAL and the
//! other sinks keep every record as it arrived.
//!
//! ```toml
//! [sinks.cloud.reduce]
//! deadband = { temperature_c = 0.2, "pressure_*" = "1%" }
//! heartbeat = "15m"
//! downsample = { every = "1m", stats = ["min", "max", "mean", "last", "count"], metrics = ["vibration_*"] }
//! ```
//!
//! - **Deadband**: a metric matching a `deadband` pattern is sent only when
//!   it moved by at least its band since the value last *sent* (absolute, or
//!   `"N%"` of that value; a boolean or a string: when it changed), or when
//!   it was last sent `heartbeat` ago or more. So the far side can rebuild
//!   every value to within its band by carrying the last value it got
//!   forward. An exact name wins over a pattern, a longer pattern over a
//!   shorter one. Metrics no pattern names are always sent.
//! - **Downsample**: the metrics matching `downsample.metrics` are taken out
//!   of each record and folded into a window of `every` per device, on the
//!   gateway's receive time (a small sensor's clock drifts and resets). A
//!   window is sent as one aggregate record with `{metric}_{stat}` metrics,
//!   a `window` object (`start`, `end`, `records`) and the idempotency key
//!   `{device_id}:agg:{start_ms}`, when a record of its device falls in a
//!   later window, or when any record of the sink's stream is received more
//!   than [`GRACE_MS`] (at most `every`) after its end. A record of a window
//!   that was already sent (late) keeps its downsampled metrics, sent as
//!   they are.
//! - A record left with no metric is not sent; its acknowledgement still
//!   counts. `high` records are never reduced and do not touch the state.
//!
//! Determinism: the output is a function of the state and the records in
//! the order the sink is given them, nothing else (no clock). The dispatcher
//! hands a batch to [`Reducer::reduce`], which returns what to send and the
//! state after it ([`Step`]); the state's changed rows ride with the
//! batch's acknowledgement into the same WAL transaction, and only then
//! does the reducer take them ([`Reducer::commit`]). A crash before that
//! commit brings back the older state and the same records, so the sink
//! sends the same output again (the same aggregates under the same keys),
//! never a different one. Floats in the state are kept as their bits, so a
//! state read back from disk is the state that was written.
//!
//! A change of the reduce settings (or their removal) sends every open
//! window with the next record, before that record is reduced under the new
//! settings.
//!
//! Rooms: the settings and their parsing are in `settings.rs`; this file
//! is the state machine ([`Reducer`], [`Step`]) and the state it keeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::ingest::validate::format_ts;
use crate::route::Class;
use crate::wal::{Batch, StoredRecord};

mod settings;

pub use settings::{glob, Band, Downsample, Reduce, Stat};

/// A stale window is sent once a record of the stream is received this long
/// after its end (or `every`, if shorter): the slack for records appended a
/// little out of receive order.
pub const GRACE_MS: i64 = 2_000;

/// A value as the state keeps it: a number by its bits, so that it reads
/// back exactly; anything else as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Kept {
    #[serde(rename = "n")]
    Num(u64),
    #[serde(rename = "o")]
    Other(Value),
}

impl Kept {
    fn of(v: &Value) -> Kept {
        match v.as_f64() {
            Some(x) => Kept::Num(x.to_bits()),
            None => Kept::Other(v.clone()),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Kept::Num(b) => Number::from_f64(f64::from_bits(*b)).map_or(Value::Null, Value::Number),
            Kept::Other(v) => v.clone(),
        }
    }
}

/// One downsampled metric's accumulators in an open window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Acc {
    /// Values folded.
    n: u64,
    /// Numbers folded (min, max and mean are over these).
    nums: u64,
    min: u64,
    max: u64,
    sum: u64,
    last: Kept,
}

/// A device's open window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Window {
    /// Start, epoch ms (receive time).
    start: i64,
    /// Its length, ms, as it was opened.
    every: i64,
    /// Records folded.
    records: u64,
    acc: BTreeMap<String, Acc>,
    /// The last folded record without its metrics: the aggregate's fields.
    head: Map<String, Value>,
}

impl Window {
    fn deadline(&self) -> i64 {
        self.start + self.every + GRACE_MS.min(self.every)
    }
}

/// One device's reduction state for one sink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct DeviceState {
    /// Deadbanded metric → the value last sent and when (receive ms).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    sent: BTreeMap<String, (Kept, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    win: Option<Window>,
    /// Start of the last window sent: a record of it or earlier is late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    closed: Option<i64>,
}

impl DeviceState {
    fn is_empty(&self) -> bool {
        self == &DeviceState::default()
    }
}

/// What one batch's reduction did, for `gateway_sink_reduced_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Metric values held back by a deadband.
    pub deadband: u64,
    /// Metric values folded into a window.
    pub downsample: u64,
    /// Records not sent at all (nothing left in them).
    pub records: u64,
    /// Aggregates sent.
    pub aggregates: u64,
}

/// One batch's reduction: what to send, and the state after it.
#[derive(Debug)]
pub struct Step {
    /// The records to send (reduced records and aggregates), in order.
    pub wire: Batch,
    /// What it did.
    pub counts: Counts,
    /// The devices it changed, as they are after it.
    changed: HashMap<String, DeviceState>,
    /// The settings the state is now kept under, if that changed.
    tag: Option<String>,
}

/// The row of the settings' tag among a sink's state rows (no device id is
/// empty).
const TAG_ROW: &str = "";

impl Step {
    /// The state rows this step changes: device id → its state as JSON, or
    /// `None` to delete the row; stored with the batch's acknowledgement.
    pub fn rows(&self) -> Vec<(String, Option<String>)> {
        let mut rows: Vec<(String, Option<String>)> = self
            .changed
            .iter()
            .map(|(d, st)| {
                let v = (!st.is_empty()).then(|| serde_json::to_string(st).unwrap_or_default());
                (d.clone(), v)
            })
            .collect();
        if let Some(t) = &self.tag {
            rows.push((
                TAG_ROW.into(),
                (!t.is_empty()).then(|| serde_json::json!({ "settings": t }).to_string()),
            ));
        }
        rows.sort();
        rows
    }
}

/// A sink's reduction: its settings and the state committed with its acks.
#[derive(Debug, Default)]
pub struct Reducer {
    cfg: Option<Reduce>,
    /// `cfg` as JSON ("" for none): open windows are sent when it changes.
    tag: String,
    /// The tag the stored state was kept under.
    stored_tag: String,
    devices: HashMap<String, DeviceState>,
}

impl Reducer {
    /// A reducer with `cfg`, from the state rows stored with the sink's
    /// acks (`(device, json)`); a row that does not parse is logged and
    /// left out (that device starts afresh).
    pub fn load(sink: &str, cfg: Option<Reduce>, rows: Vec<(String, String)>) -> Reducer {
        let mut r = Reducer::default();
        for (device, json) in rows {
            if device == TAG_ROW {
                r.stored_tag = serde_json::from_str::<Value>(&json)
                    .ok()
                    .and_then(|v| v.get("settings")?.as_str().map(str::to_string))
                    .unwrap_or_default();
                continue;
            }
            match serde_json::from_str::<DeviceState>(&json) {
                Ok(st) => {
                    r.devices.insert(device, st);
                }
                Err(e) => {
                    tracing::error!(sink, device = %device, error = %e, "unreadable reduce state; this device starts afresh")
                }
            }
        }
        r.set_config(cfg);
        r
    }

    /// New settings; open windows are sent with the next record.
    pub fn set_config(&mut self, cfg: Option<Reduce>) {
        self.tag = cfg
            .as_ref()
            .map_or_else(String::new, |c| c.to_json().to_string());
        self.cfg = cfg;
    }

    /// The settings in force.
    pub fn config(&self) -> Option<&Reduce> {
        self.cfg.as_ref()
    }

    /// Whether batches go through [`Reducer::reduce`]: there are settings,
    /// or state left from earlier ones to send or clear.
    pub fn active(&self) -> bool {
        self.cfg.is_some() || !self.devices.is_empty() || !self.stored_tag.is_empty()
    }

    /// Takes a step's state: its acknowledgement was accepted by the WAL.
    pub fn commit(&mut self, step: Step) {
        for (d, st) in step.changed {
            if st.is_empty() {
                self.devices.remove(&d);
            } else {
                self.devices.insert(d, st);
            }
        }
        if let Some(t) = step.tag {
            self.stored_tag = t;
        }
    }

    /// Reduces `batch` from the committed state (which it does not change).
    pub fn reduce(&self, batch: &Batch) -> Step {
        let mut run = Run {
            r: self,
            changed: HashMap::new(),
            deadlines: self
                .devices
                .iter()
                .filter_map(|(d, st)| Some((st.win.as_ref()?.deadline(), d.clone())))
                .collect(),
            out: Vec::with_capacity(batch.records.len()),
            counts: Counts::default(),
            tag: None,
        };
        for rec in &batch.records {
            run.record(rec);
        }
        Step {
            wire: Batch {
                sink: batch.sink.clone(),
                ranges: batch.ranges.clone(),
                records: run.out,
            },
            counts: run.counts,
            changed: run.changed,
            tag: run.tag,
        }
    }
}

/// One batch's reduction under way.
struct Run<'a> {
    r: &'a Reducer,
    /// Devices touched so far, as they are now.
    changed: HashMap<String, DeviceState>,
    /// Open windows by when they go stale.
    deadlines: BTreeSet<(i64, String)>,
    out: Vec<StoredRecord>,
    counts: Counts,
    tag: Option<String>,
}

impl Run<'_> {
    fn state(&mut self, device: &str) -> &mut DeviceState {
        if !self.changed.contains_key(device) {
            let st = self.r.devices.get(device).cloned().unwrap_or_default();
            self.changed.insert(device.to_string(), st);
        }
        self.changed.get_mut(device).expect("inserted above")
    }

    /// Sends `device`'s open window, if any, as an aggregate at `at`'s seq.
    fn close(&mut self, device: &str, at: &StoredRecord) {
        let stats = self
            .r
            .cfg
            .as_ref()
            .and_then(|c| c.downsample.as_ref())
            .map_or_else(|| Stat::ALL.to_vec(), |d| d.stats.clone());
        let st = self.state(device);
        let Some(w) = st.win.take() else {
            return;
        };
        st.closed = Some(w.start);
        self.deadlines.remove(&(w.deadline(), device.to_string()));
        self.counts.aggregates += 1;
        self.out.push(aggregate(device, &w, &stats, at));
    }

    fn record(&mut self, rec: &StoredRecord) {
        if rec.class == Class::High {
            self.out.push(rec.clone());
            return;
        }
        if self.tag.is_none() && self.r.tag != self.r.stored_tag {
            // New settings: what the old ones kept open goes first.
            let open: Vec<String> = self.deadlines.iter().map(|(_, d)| d.clone()).collect();
            for d in open {
                self.close(&d, rec);
            }
            if self.r.cfg.is_none() {
                // No reduction any more: forget every device.
                let all: Vec<String> = self.r.devices.keys().cloned().collect();
                for d in all {
                    *self.state(&d) = DeviceState::default();
                }
            }
            self.tag = Some(self.r.tag.clone());
        }
        let r: &Reducer = self.r;
        let Some(cfg) = r.cfg.as_ref() else {
            self.out.push(rec.clone());
            return;
        };
        // Windows gone stale by this record's receive time.
        while let Some((due, d)) = self.deadlines.first().cloned() {
            if due > rec.receive_ms {
                break;
            }
            self.close(&d, rec);
        }
        let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(&rec.json) else {
            self.out.push(rec.clone());
            return;
        };
        let Some(Value::Object(metrics)) = body.remove("metrics") else {
            self.out.push(rec.clone());
            return;
        };
        let before = metrics.len();
        let (mut folded, mut rest): (Vec<_>, Vec<_>) =
            metrics.into_iter().partition(|(k, _)| cfg.downsampled(k));
        if let Some(ds) = cfg.downsample.as_ref().filter(|_| !folded.is_empty()) {
            let every = ds.every.as_millis().max(1) as i64;
            let start = rec.receive_ms - rec.receive_ms.rem_euclid(every);
            let open = self.state(&rec.device_id).win.as_ref().map(|w| w.start);
            if open.is_some_and(|s| s < start) {
                self.close(&rec.device_id, rec);
            }
            let st = self.state(&rec.device_id);
            let late = st.closed.is_some_and(|c| start <= c) || open.is_some_and(|s| start < s);
            if late {
                rest.append(&mut folded);
            } else {
                let n = folded.len() as u64;
                let opened = st.win.is_none();
                let w = st.win.get_or_insert_with(|| Window {
                    start,
                    every,
                    records: 0,
                    acc: BTreeMap::new(),
                    head: Map::new(),
                });
                w.records += 1;
                for (k, v) in folded.drain(..) {
                    fold(w.acc.entry(k), &v);
                }
                w.head = body.clone();
                let due = w.deadline();
                if opened {
                    self.deadlines.insert((due, rec.device_id.clone()));
                }
                self.counts.downsample += n;
            }
        }
        let heartbeat = cfg.heartbeat.map(|h| h.as_millis() as i64);
        let mut kept = Map::new();
        let mut held = 0;
        let st = self.state(&rec.device_id);
        for (k, v) in rest {
            let Some(band) = cfg.band(&k) else {
                kept.insert(k, v);
                continue;
            };
            let due = match st.sent.get(&k) {
                None => true,
                Some((last, at)) => {
                    moved(band, last, &v) || heartbeat.is_some_and(|h| rec.receive_ms - at >= h)
                }
            };
            if due {
                st.sent.insert(k.clone(), (Kept::of(&v), rec.receive_ms));
                kept.insert(k, v);
            } else {
                held += 1;
            }
        }
        self.counts.deadband += held;
        if kept.is_empty() {
            self.counts.records += 1;
        } else if kept.len() == before {
            self.out.push(rec.clone());
        } else {
            body.insert("metrics".into(), Value::Object(kept));
            self.out.push(StoredRecord {
                json: Value::Object(body).to_string(),
                ..rec.clone()
            });
        }
    }
}

/// Whether `v` moved by `band` from `last` (a non-number: whether it changed).
fn moved(band: Band, last: &Kept, v: &Value) -> bool {
    match (last, v.as_f64()) {
        (Kept::Num(b), Some(x)) => {
            let last = f64::from_bits(*b);
            let diff = (x - last).abs();
            let threshold = match band {
                Band::Abs(d) => d,
                Band::Pct(p) => p / 100.0 * last.abs(),
            };
            diff > 0.0 && diff >= threshold
        }
        (last, _) => *last != Kept::of(v),
    }
}

fn fold(e: std::collections::btree_map::Entry<'_, String, Acc>, v: &Value) {
    let x = v.as_f64();
    let acc = e.or_insert_with(|| Acc {
        n: 0,
        nums: 0,
        min: f64::INFINITY.to_bits(),
        max: f64::NEG_INFINITY.to_bits(),
        sum: 0f64.to_bits(),
        last: Kept::of(v),
    });
    acc.n += 1;
    acc.last = Kept::of(v);
    if let Some(x) = x {
        acc.nums += 1;
        acc.min = f64::from_bits(acc.min).min(x).to_bits();
        acc.max = f64::from_bits(acc.max).max(x).to_bits();
        acc.sum = (f64::from_bits(acc.sum) + x).to_bits();
    }
}

/// The aggregate record of `device`'s window `w`, sent at `at`'s seq.
fn aggregate(device: &str, w: &Window, stats: &[Stat], at: &StoredRecord) -> StoredRecord {
    let num = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    let mut metrics = Map::new();
    for (k, a) in &w.acc {
        for s in stats {
            let v = match s {
                Stat::Min if a.nums > 0 => num(f64::from_bits(a.min)),
                Stat::Max if a.nums > 0 => num(f64::from_bits(a.max)),
                Stat::Mean if a.nums > 0 => num(f64::from_bits(a.sum) / a.nums as f64),
                Stat::Last => a.last.to_value(),
                Stat::Count => Value::from(a.n),
                _ => continue,
            };
            metrics.insert(format!("{k}_{}", s.name()), v);
        }
    }
    let key = format!("{device}:agg:{}", w.start);
    let mut body = w.head.clone();
    body.insert("seq".into(), Value::from(at.seq));
    body.insert("idempotency_key".into(), Value::String(key.clone()));
    body.insert("metrics".into(), Value::Object(metrics));
    body.insert(
        "window".into(),
        serde_json::json!({
            "start": format_ts(w.start),
            "end": format_ts(w.start + w.every),
            "records": w.records,
        }),
    );
    let correlation_id = body
        .get("correlation_id")
        .and_then(Value::as_str)
        .unwrap_or(&at.correlation_id)
        .to_string();
    StoredRecord {
        seq: at.seq,
        device_id: device.to_string(),
        idempotency_key: key,
        correlation_id,
        receive_ms: at.receive_ms,
        class: Class::Normal,
        json: Value::Object(body).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Reduce {
        Reduce::from_value(&v).unwrap().unwrap()
    }

    fn rec(seq: u64, device: &str, rx: i64, metrics: Value) -> StoredRecord {
        let json = json!({
            "v": 1, "seq": seq, "idempotency_key": format!("{device}:{seq}"),
            "correlation_id": format!("c{seq}"), "gateway_id": "gw", "device_id": device,
            "metrics": metrics, "tags": {"site": "a"},
        });
        StoredRecord {
            seq,
            device_id: device.into(),
            idempotency_key: format!("{device}:{seq}"),
            correlation_id: format!("c{seq}"),
            receive_ms: rx,
            class: Class::Normal,
            json: json.to_string(),
        }
    }

    fn batch(records: Vec<StoredRecord>) -> Batch {
        let ranges = records.iter().map(|r| (r.seq, r.seq)).collect();
        Batch {
            sink: "s".into(),
            ranges,
            records,
        }
    }

    fn sent(step: &Step) -> Vec<Value> {
        step.wire
            .records
            .iter()
            .map(|r| serde_json::from_str(&r.json).unwrap())
            .collect()
    }

    /// Runs `records` in batches of `size` through a reducer whose state
    /// goes through its stored rows after every batch, as after a restart.
    fn through_rows(r: Reduce, records: &[StoredRecord], size: usize) -> Vec<Value> {
        let mut rows: BTreeMap<String, String> = BTreeMap::new();
        let mut out = Vec::new();
        for chunk in records.chunks(size) {
            let red = Reducer::load("s", Some(r.clone()), rows.clone().into_iter().collect());
            let step = red.reduce(&batch(chunk.to_vec()));
            out.extend(sent(&step));
            for (d, v) in step.rows() {
                match v {
                    Some(v) => rows.insert(d, v),
                    None => rows.remove(&d),
                };
            }
        }
        out
    }

    #[test]
    fn a_deadband_sends_a_metric_only_when_it_moved_from_the_value_last_sent_or_its_heartbeat_is_due(
    ) {
        let r = Reducer::load(
            "s",
            Some(cfg(
                json!({"deadband": {"t": 0.2, "p": "10%", "flag": 0}, "heartbeat": "10s"}),
            )),
            vec![],
        );
        let step = r.reduce(&batch(vec![
            rec(
                1,
                "d",
                0,
                json!({"t": 20.0, "p": 100, "flag": false, "other": 1}),
            ),
            rec(
                2,
                "d",
                1000,
                json!({"t": 20.1, "p": 109, "flag": false, "other": 1}),
            ),
            rec(3, "d", 2000, json!({"t": 20.19, "p": 111, "flag": true})),
            rec(4, "d", 3000, json!({"t": 20.25, "p": 105})),
            rec(5, "d", 12_000, json!({"t": 20.3, "p": 105})),
        ]));
        let metrics: Vec<Value> = sent(&step).iter().map(|v| v["metrics"].clone()).collect();
        assert_eq!(
            metrics,
            [
                json!({"t": 20.0, "p": 100, "flag": false, "other": 1}),
                json!({"other": 1}),
                json!({"p": 111, "flag": true}),
                json!({"t": 20.25}),
                // The heartbeat: p was last sent at 2000, t at 3000 (not yet).
                json!({"p": 105}),
            ]
        );
        assert_eq!(step.counts.deadband, 1 + 1 + 1 + 1 + 1 + 1);
        assert_eq!(step.counts.records, 0);
        // Nothing left: the record is not sent but counted.
        let step = r.reduce(&batch(vec![
            rec(1, "d", 0, json!({"t": 20.0})),
            rec(2, "d", 1, json!({"t": 20.05})),
        ]));
        assert_eq!(step.wire.records.len(), 1);
        assert_eq!(step.counts.records, 1);
        assert_eq!(step.wire.ranges, [(1, 1), (2, 2)], "the ack covers both");
    }

    #[test]
    fn downsample_sends_one_aggregate_per_device_window_with_its_stats_under_a_stable_key() {
        let r = Reducer::load(
            "s",
            Some(cfg(
                json!({"downsample": {"every": "10s", "metrics": ["vib_*"]}}),
            )),
            vec![],
        );
        let step = r.reduce(&batch(vec![
            rec(1, "d", 10_000, json!({"vib_x": 1.0, "t": 5})),
            rec(2, "d", 15_000, json!({"vib_x": 3.0})),
            rec(3, "e", 16_000, json!({"vib_x": 7.0})),
            // d's next window: d's first one goes.
            rec(4, "d", 21_000, json!({"vib_x": 2.0})),
            // 2 s after the end of e's window and d's second: both go.
            rec(5, "f", 32_000, json!({"t": 1})),
        ]));
        let out = sent(&step);
        let keys: Vec<&str> = out
            .iter()
            .map(|v| v["idempotency_key"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["d:1", "d:agg:10000", "e:agg:10000", "d:agg:20000", "f:5"]
        );
        assert_eq!(out[0]["metrics"], json!({"t": 5}));
        assert_eq!(
            out[1]["metrics"],
            json!({"vib_x_min": 1.0, "vib_x_max": 3.0, "vib_x_mean": 2.0, "vib_x_last": 3.0, "vib_x_count": 2})
        );
        assert_eq!(
            out[1]["seq"], 4,
            "sent at the seq of the record that closed it"
        );
        assert_eq!(out[1]["window"]["records"], 2);
        assert_eq!(out[1]["window"]["start"], format_ts(10_000));
        assert_eq!(out[1]["tags"], json!({"site": "a"}));
        assert_eq!(step.counts.aggregates, 3);
        assert_eq!(step.counts.downsample, 4);
        assert_eq!(step.counts.records, 3, "records 2, 3 and 4 had only vib_x");
    }

    #[test]
    fn a_record_of_a_window_already_sent_keeps_its_downsampled_metrics() {
        let r = Reducer::load(
            "s",
            Some(cfg(
                json!({"downsample": {"every": "10s", "metrics": ["v"]}}),
            )),
            vec![],
        );
        let step = r.reduce(&batch(vec![
            rec(1, "d", 10_000, json!({"v": 1})),
            rec(2, "d", 20_000, json!({"v": 2})),
            rec(3, "d", 19_000, json!({"v": 3})),
        ]));
        let out = sent(&step);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0]["idempotency_key"], "d:agg:10000");
        assert_eq!(out[1]["metrics"], json!({"v": 3}));
    }

    #[test]
    fn the_output_is_the_same_whatever_the_batches_and_with_the_state_read_back_from_its_rows() {
        let r = cfg(json!({
            "deadband": {"t": 0.2}, "heartbeat": "30s",
            "downsample": {"every": "10s", "metrics": ["v"]},
        }));
        let mut records = Vec::new();
        let mut t = 20.0f64;
        for i in 0..400u64 {
            t += [0.05, -0.05, 0.07, 0.03][(i % 4) as usize] * if i % 13 < 6 { 1.0 } else { -1.0 };
            let dev = ["a", "b", "c"][(i % 3) as usize];
            records.push(rec(
                i + 1,
                dev,
                1000 * i as i64 + (i as i64 % 7),
                json!({"t": t, "v": 0.1 * i as f64 + 1.0 / 3.0}),
            ));
        }
        let one = {
            let red = Reducer::load("s", Some(r.clone()), vec![]);
            sent(&red.reduce(&batch(records.clone())))
        };
        for size in [1, 7, 64] {
            assert_eq!(
                through_rows(r.clone(), &records, size),
                one,
                "batches of {size}"
            );
        }
        assert!(one.len() < records.len());
    }

    #[test]
    fn new_settings_send_the_open_windows_first_and_none_forgets_every_device() {
        let ds =
            cfg(json!({"deadband": {"t": 1}, "downsample": {"every": "10s", "metrics": ["v"]}}));
        let mut red = Reducer::load("s", Some(ds), vec![]);
        let step = red.reduce(&batch(vec![rec(1, "d", 10_000, json!({"v": 1, "t": 1}))]));
        red.commit(step);
        red.set_config(None);
        assert!(red.active());
        let step = red.reduce(&batch(vec![rec(2, "d", 11_000, json!({"v": 2, "t": 1}))]));
        let out = sent(&step);
        assert_eq!(out[0]["idempotency_key"], "d:agg:10000");
        assert_eq!(
            out[1]["metrics"],
            json!({"v": 2, "t": 1}),
            "not reduced any more"
        );
        assert!(
            step.rows().iter().all(|(_, v)| v.is_none()),
            "{:?}",
            step.rows()
        );
        red.commit(step);
        assert!(!red.active());
    }

    #[test]
    fn high_records_are_never_reduced() {
        let r = Reducer::load("s", Some(cfg(json!({"deadband": {"t": 100}}))), vec![]);
        let mut a = rec(1, "d", 0, json!({"t": 1}));
        let mut b = rec(2, "d", 1, json!({"t": 1}));
        a.class = Class::High;
        b.class = Class::High;
        assert_eq!(r.reduce(&batch(vec![a, b])).wire.records.len(), 2);
    }
}
