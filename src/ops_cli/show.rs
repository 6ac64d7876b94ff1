//! How the operator subcommands print: a command's JSON result as text
//! for people (WAL stats, the consistency check, dead letters, sinks,
//! `gateway status`) unless `--json` asks for the document itself, and a
//! progress line on a terminal. Where a command runs and what it sends is
//! `ops_cli.rs`'s business; this room only prints.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::EXIT_PROBLEMS;

/// How a command's result is shown without `--json`.
#[derive(Clone, Copy)]
pub(super) enum Show {
    Json,
    WalStats,
    WalCheck,
    DlqList,
    Sinks,
}

pub(super) fn present(v: &Value, show: Show, json_out: bool) -> ExitCode {
    let problems = matches!(show, Show::WalCheck) && v["ok"] != Value::Bool(true);
    if json_out {
        println!("{v}");
    } else {
        match show {
            Show::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
            Show::WalStats => show_stats(v),
            Show::WalCheck => show_check(v),
            Show::DlqList => show_dlq(v),
            Show::Sinks => show_sinks(v),
        }
    }
    if problems {
        ExitCode::from(EXIT_PROBLEMS)
    } else {
        ExitCode::SUCCESS
    }
}

/// A table cell: strings without quotes, null as "-".
pub(super) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn age(secs: &Value) -> String {
    match secs.as_i64() {
        None => "-".into(),
        Some(s) => humantime::format_duration(Duration::from_secs(s.max(0) as u64)).to_string(),
    }
}

pub(super) fn show_stats(v: &Value) {
    println!(
        "head seq {}, {} records stored, {} bytes, {} bytes free on disk, backpressure {}",
        v["head"], v["stored_records"], v["live_bytes"], v["disk_free_bytes"], v["backpressure"]
    );
    println!(
        "{:<16} {:>10} {:>9} {:>9} {:>14} {:>14}",
        "SINK", "PENDING", "INFLIGHT", "DEAD", "OLDEST", "~PENDING BYTES"
    );
    if let Some(sinks) = v["sinks"].as_object() {
        for (name, s) in sinks {
            println!(
                "{:<16} {:>10} {:>9} {:>9} {:>14} {:>14}",
                name,
                cell(&s["enqueued"]),
                cell(&s["inflight"]),
                cell(&s["dead"]),
                age(&s["oldest_pending_age_s"]),
                cell(&s["pending_bytes"])
            );
        }
    }
}

pub(super) fn show_check(v: &Value) {
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    println!(
        "WAL check: {} ({} records, {} dead letters, {} problem(s))",
        if v["ok"] == Value::Bool(true) {
            "ok"
        } else {
            "PROBLEMS"
        },
        v["records"],
        v["dead_letters"],
        problems.len()
    );
    for p in problems {
        let state = if p["repaired"] == Value::Bool(true) {
            "repaired"
        } else if p["repairable"] == Value::Bool(true) {
            "repairable with --repair"
        } else {
            "not repairable"
        };
        println!(
            "- [{}] {} ({state})",
            p["kind"].as_str().unwrap_or("?"),
            p["detail"].as_str().unwrap_or("")
        );
    }
}

pub(super) fn show_dlq(v: &Value) {
    let list = v["dead_letters"].as_array().cloned().unwrap_or_default();
    println!(
        "{} dead letter(s) match; showing {}",
        v["total"],
        list.len()
    );
    for d in &list {
        let when = d["dead_ms"]
            .as_i64()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        println!(
            "seq {:<10} sink {:<12} device {:<20} dead {} attempts {} error: {}",
            cell(&d["seq"]),
            d["sink"].as_str().unwrap_or(""),
            d["device_id"].as_str().unwrap_or(""),
            when,
            cell(&d["attempts"]),
            d["error"].as_str().unwrap_or("")
        );
    }
    if let Some(n) = v["next_after_seq"].as_u64() {
        println!("more: --after-seq {n}");
    }
}

pub(super) fn show_status(v: &Value) {
    let g = &v["gateway"];
    println!(
        "gateway {} {}, up {}, bundle {}, MQTT {}",
        g["id"].as_str().unwrap_or("?"),
        g["version"].as_str().unwrap_or("?"),
        humantime::format_duration(Duration::from_secs(g["uptime_s"].as_u64().unwrap_or(0))),
        g["bundle"]["version"].as_str().unwrap_or("none"),
        g["mqtt"]["state"].as_str().unwrap_or("?"),
    );
    for (src, s) in v["ingest"]["sources"].as_object().into_iter().flatten() {
        println!(
            "ingest {src}: {} accepted, {}/s",
            cell(&s["total"]),
            cell(&s["per_s"])
        );
    }
    let w = &v["wal"];
    println!(
        "WAL {} of {} bytes, disk free {}, full in {}{}",
        cell(&w["bytes"]),
        cell(&w["limit_bytes"]),
        cell(&w["disk_free_bytes"]),
        w["full_in_s"]
            .as_u64()
            .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string())
            .unwrap_or_else(|| "not known".into()),
        if w["backpressure"] == Value::Bool(true) {
            ", BACKPRESSURE (ingest refused)"
        } else {
            ""
        }
    );
    println!(
        "{:<16} {:<13} {:>9} {:>10} {:>8} {:>6}  LAST ERROR",
        "SINK", "STATE", "BACKLOG", "OLDEST_S", "RATE/S", "DEAD"
    );
    for s in v["sinks"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<13} {:>9} {:>10} {:>8} {:>6}  {}",
            s["name"].as_str().unwrap_or(""),
            s["condition"].as_str().unwrap_or("?"),
            cell(&s["backlog"]),
            cell(&s["oldest_pending_age_s"]),
            cell(&s["delivered_per_s"]),
            cell(&s["dead_letters"]),
            s["last_error"].as_str().unwrap_or("-"),
        );
    }
    let d = &v["dead_letters"];
    println!("dead letters: {}", cell(&d["total"]));
    for l in d["recent"].as_array().into_iter().flatten() {
        println!(
            "  {} seq {} device {}: {}",
            l["sink"].as_str().unwrap_or(""),
            cell(&l["seq"]),
            l["device_id"].as_str().unwrap_or(""),
            l["reason"].as_str().unwrap_or("")
        );
    }
}

pub(super) fn show_sinks(v: &Value) {
    println!(
        "{:<16} {:<13} {:>10} {:>9} {:>9}  LAST ERROR",
        "SINK", "STATE", "PENDING", "INFLIGHT", "DEAD"
    );
    for s in v.as_array().cloned().unwrap_or_default() {
        println!(
            "{:<16} {:<13} {:>10} {:>9} {:>9}  {}",
            s["name"].as_str().unwrap_or(""),
            s["condition"].as_str().unwrap_or("?"),
            cell(&s["wal"]["enqueued"]),
            cell(&s["wal"]["inflight"]),
            cell(&s["wal"]["dead"]),
            s["last_error"].as_str().unwrap_or("-"),
        );
    }
}

/// A progress line on a terminal (stderr), nothing when piped.
pub(super) struct Progress {
    on: bool,
    last: Instant,
}

impl Progress {
    pub(super) fn new() -> Self {
        Self {
            on: std::io::stderr().is_terminal(),
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    pub(super) fn show(&mut self, done: u64, total: u64, what: &str, force: bool) {
        if !self.on || (!force && self.last.elapsed() < Duration::from_millis(100)) {
            return;
        }
        self.last = Instant::now();
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let width = 30usize;
        let filled = ((pct / 100.0) * width as f64).round() as usize;
        eprint!(
            "\r[{}{}] {done}/{total} {what} ({pct:.0}%)",
            "#".repeat(filled.min(width)),
            "-".repeat(width - filled.min(width))
        );
        if force {
            eprintln!();
        }
    }
}
