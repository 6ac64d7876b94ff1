//! The upkeep of a local (`file://`) archive, through a running gateway:
//! closed hours merged into one object, and `max_bytes` held.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::helpers::{
    archive_objects, archived_keys, archived_records, record_keys, spawn_app, telemetry, wait_until,
};

/// Every `.ndjson.gz` object under `dir`, with its size.
fn objects(dir: &Path) -> Vec<(PathBuf, u64)> {
    archive_objects(dir)
        .into_iter()
        .map(|p| {
            let n = std::fs::metadata(&p).map_or(0, |m| m.len());
            (p, n)
        })
        .collect()
}

fn archive_toml(dir: &Path, extra: &str) -> String {
    format!(
        "[sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nmaintenance_interval_ms = 100\n{extra}",
        dir.display()
    )
}

/// Objects of an hour long past, as an earlier run of the sink left them:
/// `parts` objects of `per` canonical records each, seqs from 1.
fn seed_closed_hour(dir: &Path, parts: u64, per: u64) -> HashSet<String> {
    let hour = dir.join("dt=2026-01-01/hour=07");
    std::fs::create_dir_all(&hour).unwrap();
    let mut keys = HashSet::new();
    for p in 0..parts {
        let (first, last) = (p * per + 1, p * per + per);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for seq in first..=last {
            let key = format!("old-{seq}");
            writeln!(
                gz,
                r#"{{"seq":{seq},"device_id":"dev-old","idempotency_key":"{key}","receive_ts":"2026-01-01T07:00:00Z"}}"#
            )
            .unwrap();
            keys.insert(key);
        }
        let name = format!("test-gw-{first}-{last}.ndjson.gz");
        std::fs::write(hour.join(name), gz.finish().unwrap()).unwrap();
    }
    keys
}

#[test]
fn the_objects_of_a_closed_hour_are_merged_into_one_and_every_record_stays_once() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    let old = seed_closed_hour(&archive, 12, 5);
    let app = spawn_app(&archive_toml(&archive, ""));
    let hour = archive.join("dt=2026-01-01/hour=07");
    wait_until("the closed hour merged", Duration::from_secs(20), || {
        objects(&hour).len() == 1
    });
    let merged = objects(&hour);
    assert!(
        merged[0].0.ends_with("test-gw-1-60.merged.ndjson.gz"),
        "{merged:?}"
    );
    assert_eq!(
        app.metric(r#"gateway_archive_merged_objects_total{sink="archive"}"#),
        12.0
    );
    // Each old record once, read back as one gzip stream.
    let records = archived_records(&hour);
    assert_eq!(records.len(), 60);
    assert_eq!(record_keys(&records), old);

    // The open hour is left as the sink writes it.
    for i in 0..3 {
        let r = app.post_json("dev-1", &telemetry(&format!("now-{i}"), 1.0));
        assert_eq!(r.status, 202, "{}", r.text);
        wait_until("delivered", Duration::from_secs(10), || {
            app.metric(r#"gateway_sink_records_total{outcome="ok",sink="archive"}"#) > i as f64
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let now: Vec<_> = objects(&archive)
        .into_iter()
        .filter(|(p, _)| !p.starts_with(&hour))
        .collect();
    assert_eq!(now.len(), 3, "one object per lone record: {now:?}");
    assert!(now
        .iter()
        .all(|(p, _)| !p.to_string_lossy().contains(".merged")));
    assert_eq!(archived_keys(&archive).len(), 63);
}

#[test]
fn an_archive_over_max_bytes_loses_its_oldest_objects_and_keeps_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive");
    // Older than anything the gateway writes: these go first.
    let old = seed_closed_hour(&archive, 4, 5);
    let max = 12_000u64;
    let app = spawn_app(&archive_toml(
        &archive,
        &format!("max_bytes = {max}\ncompact = false\n"),
    ));
    let sent = 120;
    for i in 0..sent {
        let r = app.post_json("dev-1", &telemetry(&format!("m-{i}"), i as f64));
        assert_eq!(r.status, 202, "{}", r.text);
        if i % 10 == 9 {
            // Lone records: an object each (a few hundred bytes).
            wait_until("delivered", Duration::from_secs(10), || {
                app.metric(r#"gateway_sink_records_total{outcome="ok",sink="archive"}"#)
                    >= (i + 1) as f64
            });
        }
    }
    let total = |dir: &Path| objects(dir).iter().map(|(_, n)| n).sum::<u64>();
    wait_until(
        "the archive back under max_bytes",
        Duration::from_secs(20),
        || {
            total(&archive) <= max
                && app.metric(r#"gateway_archive_bytes{sink="archive"}"#) as u64 == total(&archive)
        },
    );
    assert!(
        app.metric(r#"gateway_archive_pruned_objects_total{sink="archive"}"#) > 0.0,
        "nothing was pruned: the test wrote too little"
    );
    let kept = archived_keys(&archive);
    assert!(kept.is_disjoint(&old), "the oldest objects go first");
    // The newest records are all there (pruning goes oldest first).
    for i in sent - 10..sent {
        assert!(
            kept.contains(&format!("dev-1:m-{i}")),
            "m-{i} was pruned: {kept:?}"
        );
    }
    assert!(
        kept.len() < sent,
        "{} of {sent} kept: nothing of the new ones went",
        kept.len()
    );
    // The seeded hour is emptied and gone.
    assert!(!archive.join("dt=2026-01-01/hour=07").exists());
}
