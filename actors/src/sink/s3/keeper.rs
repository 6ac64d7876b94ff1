//! Upkeep of a local archive (an `s3` sink with a `file://` target): a
//! thread of its own that, every `maintenance_interval_ms`,
//!
//! - **compacts** the archive. Adaptive batching writes an object every few
//!   records under light load, and each one takes a file-system block. In
//!   the open hour, the batches' objects older than 30 s are merged into one
//!   object (one gzip member: the records compress together); each closed
//!   hour (`dt=…/hour=HH`, ended more than five minutes ago) becomes one
//!   object per gateway id. Concatenated gzip members are one valid gzip
//!   stream, so earlier merged objects are copied as they are. A merged
//!   object is named `{gateway_id}-{first_seq}-{last_seq}.merged.ndjson.gz`:
//!   its seq range spans its parts, and the `.merged` keeps a batch the
//!   sink writes later from ever taking (and overwriting) its name.
//! - **bounds** the archive to `max_bytes`: over it, the oldest objects go
//!   first (by hour, then seq) until it fits.
//!
//! A merge survives a crash or a power cut at any step: the merged object is
//! written under a temporary name and synced; a manifest naming it and its
//! parts is synced; the object is renamed into place and the directory
//! synced; only then are the parts deleted, and the manifest last. The next
//! pass finds a manifest left behind and finishes the merge (the object is
//! in place) or undoes it (the temporary file is still there), so a record
//! is never in two objects of one hour nor in none. That protocol is
//! `keeper/merge.rs`; this file is the pass (what to merge, pruning) and
//! its thread.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use chrono::NaiveDate;

use crate::durable::sync_dir;
use crate::metrics::Metrics;
use crate::wal::now_ms;

mod merge;

use merge::{merge, output_of_temp, recover, Merge};

/// Names every archive object ends with.
const SUFFIX: &str = ".ndjson.gz";
/// Before [`SUFFIX`] in the name of a merged object.
const MERGED: &str = ".merged";
/// An hour is compacted this long after it ended (late batches of the hour
/// are still merged by a later pass).
const GRACE_MS: i64 = 5 * 60 * 1000;
/// In the open hour, a batch's object is merged once it is this old.
const SETTLE_MS: i64 = 30_000;
const HOUR_MS: i64 = 3_600_000;

/// What the upkeep of one local archive does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeeperConfig {
    /// The sink's name (metric label, thread name).
    pub sink: String,
    /// The archive's directory.
    pub dir: PathBuf,
    /// Merge each closed hour into one object.
    pub compact: bool,
    /// gzip level of the merged records (the sink's `gzip_level`).
    pub gzip_level: u32,
    /// Delete the oldest objects while the archive is larger.
    pub max_bytes: Option<u64>,
    /// Time between passes.
    pub interval: Duration,
}

/// What one pass did and found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Merged objects made in this pass.
    pub merges: u64,
    /// Objects replaced by merged ones.
    pub merged_objects: u64,
    /// Objects deleted to stay under `max_bytes`.
    pub pruned_objects: u64,
    /// Their bytes.
    pub pruned_bytes: u64,
    /// Objects of closed hours that do not decompress (left unmerged).
    pub unreadable: Vec<PathBuf>,
    /// Objects in the archive after the pass.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// One object of the archive.
#[derive(Debug, Clone)]
struct Object {
    name: String,
    /// Made by an earlier merge.
    merged: bool,
    /// Last modified, ms since the epoch.
    mtime_ms: i64,
    gateway_id: String,
    first: u64,
    last: u64,
    size: u64,
}

/// `(gateway_id, first_seq, last_seq, merged)` of an object's file name.
fn parse_name(name: &str) -> Option<(&str, u64, u64, bool)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (stem, merged) = match stem.strip_suffix(MERGED) {
        Some(s) => (s, true),
        None => (stem, false),
    };
    let mut parts = stem.rsplitn(3, '-');
    let last = parts.next()?.parse().ok()?;
    let first = parts.next()?.parse().ok()?;
    let gateway_id = parts.next().filter(|g| !g.is_empty())?;
    (first <= last).then_some((gateway_id, first, last, merged))
}

/// The start (ms since the epoch, UTC) of the hour of `dt=YYYY-MM-DD/hour=HH`.
fn hour_start(day: &str, hour: &str) -> Option<i64> {
    let date = NaiveDate::parse_from_str(day.strip_prefix("dt=")?, "%Y-%m-%d").ok()?;
    let h: u32 = hour.strip_prefix("hour=")?.parse().ok()?;
    Some(date.and_hms_opt(h, 0, 0)?.and_utc().timestamp_millis())
}

/// The hour directories under `root`, oldest first, with their start.
fn hour_dirs(root: &Path) -> io::Result<Vec<(i64, PathBuf)>> {
    let mut out = Vec::new();
    let days = match fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for day in days {
        let day = day?;
        let day_name = day.file_name().to_string_lossy().into_owned();
        if !day_name.starts_with("dt=") || !day.file_type()?.is_dir() {
            continue;
        }
        for hour in fs::read_dir(day.path())? {
            let hour = hour?;
            let hour_name = hour.file_name().to_string_lossy().into_owned();
            if let Some(start) = hour_start(&day_name, &hour_name) {
                if hour.file_type()?.is_dir() {
                    out.push((start, hour.path()));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The objects in one hour directory, by gateway id and seq.
fn objects_in(dir: &Path) -> io::Result<Vec<Object>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((gateway_id, first, last, merged)) = parse_name(&name) else {
            // The temporary file of a merge that never reached its manifest
            // (a crash; [`recover`] has already dealt with any manifest).
            if output_of_temp(&name).is_some_and(|out| out.ends_with(SUFFIX)) {
                remove_if_there(&dir.join(&name))?;
            }
            continue;
        };
        let meta = match e.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => continue,
            // Deleted since the listing (the sink does not delete, but be calm).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        out.push(Object {
            merged,
            gateway_id: gateway_id.to_string(),
            first,
            last,
            size: meta.len(),
            mtime_ms: meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64),
            name,
        });
    }
    out.sort_by(|a, b| (&a.gateway_id, a.first, a.last).cmp(&(&b.gateway_id, b.first, b.last)));
    Ok(out)
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// One pass over the archive at `now_ms`: recover, compact the closed
/// hours, prune down to `max_bytes`, and count what is left.
pub fn run_pass(cfg: &KeeperConfig, now_ms: i64) -> io::Result<PassReport> {
    let mut report = PassReport::default();
    // (hour start, dir, object), oldest first.
    let mut all: Vec<(i64, PathBuf, Object)> = Vec::new();
    for (start, dir) in hour_dirs(&cfg.dir)? {
        recover(&dir)?;
        let mut objects = objects_in(&dir)?;
        if cfg.compact {
            let closed = start + HOUR_MS + GRACE_MS <= now_ms;
            let mut by_id: BTreeMap<&str, Vec<Object>> = BTreeMap::new();
            for o in &objects {
                // A closed hour: everything. The open hour: the batches' objects
                // that have settled, into one more merged object; the hour's
                // merged objects become one when it closes.
                if !closed && (o.merged || o.mtime_ms + SETTLE_MS > now_ms) {
                    continue;
                }
                by_id.entry(&o.gateway_id).or_default().push(o.clone());
            }
            let merges_before = report.merges;
            for mut parts in by_id.into_values() {
                while parts.len() > 1 {
                    match merge(&dir, parts.clone(), cfg.gzip_level)? {
                        Merge::Done(out) => {
                            tracing::debug!(dir = %dir.display(), object = %out, "archive objects merged");
                            report.merged_objects += parts.len() as u64;
                            report.merges += 1;
                            break;
                        }
                        // It stays as it is, out of the merge, for an
                        // operator to look at.
                        Merge::Unreadable(i) => {
                            report.unreadable.push(dir.join(&parts.remove(i).name));
                        }
                    }
                }
            }
            if report.merges > merges_before {
                objects = objects_in(&dir)?;
            }
        }
        all.extend(objects.into_iter().map(|o| (start, dir.clone(), o)));
    }
    all.sort_by_key(|(start, _, o)| (*start, o.first));
    let mut bytes: u64 = all.iter().map(|(_, _, o)| o.size).sum();
    let mut pruned_dirs = Vec::new();
    if let Some(max) = cfg.max_bytes {
        let mut oldest = all.iter();
        while bytes > max {
            let Some((start, dir, o)) = oldest.next() else {
                break;
            };
            remove_if_there(&dir.join(&o.name))?;
            bytes -= o.size;
            report.pruned_objects += 1;
            report.pruned_bytes += o.size;
            if pruned_dirs.last() != Some(&(*start, dir)) {
                pruned_dirs.push((*start, dir));
            }
        }
    }
    for (start, dir) in &pruned_dirs {
        sync_dir(dir)?;
        // An emptied closed hour goes, and its day if that is empty too (a
        // late batch of the hour makes them again).
        if start + HOUR_MS + GRACE_MS <= now_ms && fs::remove_dir(dir).is_ok() {
            if let Some(day) = dir.parent() {
                if fs::remove_dir(day).is_ok() {
                    sync_dir(&cfg.dir)?;
                } else {
                    sync_dir(day)?;
                }
            }
        }
    }
    report.objects = all.len() as u64 - report.pruned_objects;
    report.bytes = bytes;
    Ok(report)
}

/// The running upkeep of one archive; dropping it stops the thread after
/// its current pass.
pub struct ArchiveKeeper {
    _stop: mpsc::Sender<()>,
}

impl ArchiveKeeper {
    /// Starts the upkeep thread: a pass at once, then one every `interval`.
    pub fn start(cfg: KeeperConfig, metrics: Metrics) -> io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("archive-{}", cfg.sink))
            .spawn(move || {
                let sink = cfg.sink.as_str();
                let (merged, pruned) = (
                    metrics.archive_merged.with_label_values(&[sink]),
                    metrics.archive_pruned.with_label_values(&[sink]),
                );
                let (objects, bytes) = (
                    metrics.archive_objects.with_label_values(&[sink]),
                    metrics.archive_bytes.with_label_values(&[sink]),
                );
                let mut failing = false;
                let mut unreadable = std::collections::HashSet::new();
                loop {
                    match run_pass(&cfg, now_ms()) {
                        Ok(r) => {
                            failing = false;
                            merged.inc_by(r.merged_objects);
                            pruned.inc_by(r.pruned_objects);
                            objects.set(r.objects as i64);
                            bytes.set(r.bytes as i64);
                            if r.merges > 0 {
                                tracing::debug!(sink, merges = r.merges, objects = r.merged_objects, "archive objects merged");
                            }
                            for path in r.unreadable {
                                if unreadable.insert(path.clone()) {
                                    tracing::warn!(sink, object = %path.display(), "archive object does not decompress; left out of its hour's merge");
                                }
                            }
                            if r.pruned_objects > 0 {
                                tracing::warn!(sink, objects = r.pruned_objects, bytes = r.pruned_bytes, max_bytes = cfg.max_bytes, "archive over max_bytes: oldest objects deleted");
                            }
                        }
                        Err(e) => {
                            // Logged once per failing streak (a full disk, say).
                            if !failing {
                                tracing::warn!(sink, dir = %cfg.dir.display(), error = %e, "archive upkeep failed; trying again next pass");
                            }
                            failing = true;
                        }
                    }
                    match stopped.recv_timeout(cfg.interval) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
            })?;
        Ok(Self { _stop: stop })
    }
}

#[cfg(test)]
mod tests {
    use super::merge::{temp_name, MANIFEST};
    use super::*;
    use crate::route::Class;
    use crate::wal::{Batch, StoredRecord};
    use std::fs::File;
    use std::io::Read;

    const NOW: i64 = 1_767_225_600_000 + 10 * HOUR_MS; // 2026-01-01T10:00Z

    fn cfg(dir: &Path) -> KeeperConfig {
        KeeperConfig {
            sink: "archive".into(),
            dir: dir.to_path_buf(),
            compact: true,
            gzip_level: 1,
            max_bytes: None,
            interval: Duration::from_secs(60),
        }
    }

    /// Writes the object the sink would write for seqs `first..=last`, received at `ms`.
    fn put(root: &Path, gw: &str, first: u64, last: u64, ms: i64) -> PathBuf {
        let batch = Batch {
            sink: "archive".into(),
            ranges: vec![(first, last)],
            records: (first..=last)
                .map(|seq| StoredRecord {
                    seq,
                    device_id: "d".into(),
                    idempotency_key: format!("k{seq}"),
                    correlation_id: String::new(),
                    receive_ms: ms,
                    class: Class::Normal,
                    json: format!("{{\"seq\":{seq}}}"),
                })
                .collect(),
        };
        let key = super::super::object_key("", gw, &batch);
        let path = root.join(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, super::super::encode_batch(&batch, 1).unwrap()).unwrap();
        path
    }

    /// Every line of every object under `root`, and the object names.
    fn read_all(root: &Path) -> (Vec<String>, Vec<String>) {
        let (mut lines, mut names) = (Vec::new(), Vec::new());
        for (_, dir) in hour_dirs(root).unwrap() {
            for o in objects_in(&dir).unwrap() {
                let mut text = String::new();
                flate2::read::MultiGzDecoder::new(File::open(dir.join(&o.name)).unwrap())
                    .read_to_string(&mut text)
                    .unwrap();
                lines.extend(text.lines().map(str::to_string));
                names.push(o.name);
            }
        }
        lines.sort();
        names.sort();
        (lines, names)
    }

    #[test]
    fn the_upkeep_thread_runs_a_pass_each_interval_until_its_handle_drops() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let past = now_ms() - 3 * HOUR_MS;
        let hour = put(root, "gw", 1, 2, past).parent().unwrap().to_path_buf();
        // Only a listing: `objects_in` would tidy a merge's temporary file.
        let count = || {
            fs::read_dir(&hour)
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    name.to_string_lossy().ends_with(".ndjson.gz")
                })
                .count()
        };
        let wait_for_one = || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while count() != 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no pass merged the hour"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        put(root, "gw", 3, 4, past);
        let mut c = cfg(root);
        c.interval = Duration::from_millis(20);
        let keeper = ArchiveKeeper::start(c, Metrics::unregistered()).unwrap();
        wait_for_one();
        // A later pass merges what arrived since.
        put(root, "gw", 5, 6, past);
        wait_for_one();

        drop(keeper);
        std::thread::sleep(Duration::from_millis(100));
        put(root, "gw", 7, 8, past);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(count(), 2, "a pass ran after the keeper was dropped");
    }

    #[test]
    fn names_parse_with_dashes_in_the_gateway_id_and_the_merged_mark() {
        assert_eq!(
            parse_name("gw-1-10-20.ndjson.gz"),
            Some(("gw-1", 10, 20, false))
        );
        assert_eq!(
            parse_name("gw-1-10-20.merged.ndjson.gz"),
            Some(("gw-1", 10, 20, true))
        );
        assert_eq!(parse_name("gw-20-10.ndjson.gz"), None);
        assert_eq!(parse_name("gw-1-10-20.ndjson.gz#3"), None);
        assert_eq!(parse_name("-10-20.ndjson.gz"), None);
        assert_eq!(parse_name(".gw-1-2.merged.ndjson.gz.tmp"), None);
    }

    #[test]
    fn a_closed_hour_becomes_one_object_with_every_record_and_the_open_hour_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let old = NOW - 2 * HOUR_MS; // 08:00, closed
        for i in 0..20u64 {
            put(root, "gw", i * 3 + 1, i * 3 + 3, old + i as i64 * 1000);
        }
        // A second gateway id in the same hour keeps its own object.
        put(root, "other-gw", 100, 101, old);
        // The current hour (10:00) and the last one within its grace (09:00 at 10:04).
        put(root, "gw", 200, 201, NOW);
        put(root, "gw", 202, 203, NOW);
        let (lines_before, _) = read_all(root);
        let closed_dir = root.join("dt=2026-01-01/hour=08");
        let parts_bytes: u64 = objects_in(&closed_dir)
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum();

        let r = run_pass(&cfg(root), NOW + 4 * 60_000).unwrap();
        assert_eq!((r.merges, r.merged_objects), (1, 20));
        let (lines, names) = read_all(root);
        assert_eq!(lines, lines_before, "every record once, nothing else");
        assert_eq!(
            names,
            vec![
                "gw-1-60.merged.ndjson.gz",
                "gw-200-201.ndjson.gz",
                "gw-202-203.ndjson.gz",
                "other-gw-100-101.ndjson.gz"
            ]
        );
        assert_eq!(r.objects, 4);
        let merged_bytes: u64 = objects_in(&closed_dir)
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum();
        assert!(
            merged_bytes * 2 < parts_bytes,
            "one gzip member: {merged_bytes} bytes against {parts_bytes} in parts"
        );

        // A late batch of the closed hour is merged with the merged object by
        // the next pass; a pass with nothing to merge changes nothing.
        put(root, "gw", 30, 31, old);
        let r = run_pass(&cfg(root), NOW + 4 * 60_000).unwrap();
        assert_eq!(r.merged_objects, 2);
        let (lines2, names2) = read_all(root);
        assert_eq!(lines2.len(), lines_before.len() + 2);
        assert!(names2.contains(&"gw-1-60.merged.ndjson.gz".to_string()));
        assert_eq!(
            run_pass(&cfg(root), NOW + 4 * 60_000)
                .unwrap()
                .merged_objects,
            0
        );
        assert_eq!(read_all(root), (lines2, names2));
    }

    #[test]
    fn an_object_that_does_not_decompress_is_left_out_of_the_merge() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let old = NOW - 2 * HOUR_MS;
        for i in 0..3 {
            put(root, "gw", i * 2, i * 2 + 1, old);
        }
        let bad = put(root, "gw", 10, 11, old);
        let mut bytes = fs::read(&bad).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 0xff; // the CRC no longer matches
        fs::write(&bad, bytes).unwrap();
        let r = run_pass(&cfg(root), NOW).unwrap();
        assert_eq!(r.unreadable, vec![bad.clone()]);
        assert_eq!(r.merged_objects, 3);
        assert!(bad.exists());
        assert_eq!(r.objects, 2);
    }

    fn set_age(path: &Path, now: i64, age_ms: i64) {
        let t = std::time::UNIX_EPOCH + Duration::from_millis((now - age_ms) as u64);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn the_open_hour_merges_its_settled_objects_and_leaves_fresh_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let now = NOW + 10 * 60_000; // 10:10: hour 10 is open
        for i in 0..5 {
            set_age(&put(root, "gw", i * 2, i * 2 + 1, NOW), now, 60_000);
        }
        set_age(&put(root, "gw", 100, 101, NOW), now, 1_000);
        let r = run_pass(&cfg(root), now).unwrap();
        assert_eq!((r.merges, r.merged_objects), (1, 5));
        assert_eq!(
            read_all(root).1,
            vec!["gw-0-9.merged.ndjson.gz", "gw-100-101.ndjson.gz"]
        );
        // More settled objects make a second merged object: the first is
        // not copied again while the hour is open.
        for i in 0..3 {
            set_age(&put(root, "gw", 20 + i * 2, 21 + i * 2, NOW), now, 60_000);
        }
        let r = run_pass(&cfg(root), now).unwrap();
        assert_eq!(r.merged_objects, 3);
        let (lines, names) = read_all(root);
        assert_eq!(
            names,
            vec![
                "gw-0-9.merged.ndjson.gz",
                "gw-100-101.ndjson.gz",
                "gw-20-25.merged.ndjson.gz"
            ]
        );
        // Closed: one object.
        let r = run_pass(&cfg(root), NOW + HOUR_MS + GRACE_MS).unwrap();
        assert_eq!(r.merged_objects, 3);
        assert_eq!(
            read_all(root),
            (lines, vec!["gw-0-101.merged.ndjson.gz".to_string()])
        );
    }

    #[test]
    fn a_merge_whose_name_is_taken_keeps_the_records_already_there() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let now = NOW + 10 * 60_000;
        set_age(&put(root, "gw", 1, 5, NOW), now, 60_000);
        set_age(&put(root, "gw", 6, 10, NOW), now, 60_000);
        run_pass(&cfg(root), now).unwrap();
        let (before, _) = read_all(root);
        // Batches delivered again (a crash before their ack) span the same range.
        set_age(&put(root, "gw", 1, 2, NOW), now, 60_000);
        set_age(&put(root, "gw", 9, 10, NOW), now, 60_000);
        run_pass(&cfg(root), now).unwrap();
        let (lines, names) = read_all(root);
        assert_eq!(names, vec!["gw-1-10.merged.ndjson.gz"]);
        assert!(
            before.iter().all(|l| lines.contains(l)),
            "a record was lost"
        );
        assert_eq!(lines.len(), before.len() + 4);
    }

    #[test]
    fn compaction_off_leaves_every_object() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..3 {
            put(tmp.path(), "gw", i * 2, i * 2 + 1, NOW - 3 * HOUR_MS);
        }
        let mut c = cfg(tmp.path());
        c.compact = false;
        let r = run_pass(&c, NOW).unwrap();
        assert_eq!((r.merged_objects, r.objects), (0, 3));
    }

    /// A merge cut after each of its steps: the next pass leaves every record
    /// in exactly one object.
    #[test]
    fn a_merge_interrupted_at_any_step_is_finished_or_undone() {
        for step in 0..4 {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let parts: Vec<PathBuf> = (0..3)
                .map(|i| put(root, "gw", i * 10, i * 10 + 9, NOW - 2 * HOUR_MS))
                .collect();
            let dir = parts[0].parent().unwrap().to_path_buf();
            let (before, _) = read_all(root);
            let saved: Vec<Vec<u8>> = parts.iter().map(|p| fs::read(p).unwrap()).collect();
            let objects = objects_in(&dir).unwrap();
            let Merge::Done(out) = merge(&dir, objects.clone(), 1).unwrap() else {
                panic!("a part does not decompress")
            };
            let mut manifest = format!("{out}\n");
            for o in &objects {
                manifest.push_str(&o.name);
                manifest.push('\n');
            }
            manifest.push_str("end\n");
            // Put back what a cut after `step` leaves on disk.
            if step < 2 {
                // Before the rename: the merged object is still the temporary file.
                fs::rename(dir.join(&out), dir.join(temp_name(&out))).unwrap();
            }
            if step >= 1 {
                fs::write(dir.join(MANIFEST), &manifest).unwrap();
            }
            // Step 3: cut after the first two parts were deleted.
            let restored = if step == 3 { 2..3 } else { 0..3 };
            for i in restored {
                fs::write(&parts[i], &saved[i]).unwrap();
            }

            // Recovery alone (compaction off) leaves each record once.
            let mut c = cfg(root);
            c.compact = false;
            run_pass(&c, NOW).unwrap();
            assert_eq!(read_all(root).0, before, "step {step}: after recovery");
            let leftovers: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(leftovers.is_empty(), "step {step}: {leftovers:?}");
            // And a full pass then leaves one object.
            run_pass(&cfg(root), NOW).unwrap();
            let (lines, names) = read_all(root);
            assert_eq!(lines, before, "step {step}");
            assert_eq!(names.len(), 1, "step {step}: {names:?}");
        }
    }

    #[test]
    fn a_torn_manifest_undoes_the_merge() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let a = put(root, "gw", 1, 2, NOW - 2 * HOUR_MS);
        put(root, "gw", 3, 4, NOW - 2 * HOUR_MS);
        let dir = a.parent().unwrap();
        let (before, _) = read_all(root);
        fs::write(dir.join(temp_name("gw-1-4.merged.ndjson.gz")), b"partial").unwrap();
        fs::write(
            dir.join(MANIFEST),
            "gw-1-4.merged.ndjson.gz\ngw-1-2.ndjson.gz\n",
        )
        .unwrap();
        let mut c = cfg(root);
        c.compact = false;
        run_pass(&c, NOW).unwrap();
        assert_eq!(read_all(root).0, before);
        assert!(!dir.join(MANIFEST).exists());
        assert_eq!(fs::read_dir(dir).unwrap().count(), 2);
    }

    #[test]
    fn max_bytes_deletes_the_oldest_objects_first_and_empty_closed_hours() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let mut c = cfg(root);
        c.compact = false;
        let mut paths = Vec::new();
        for h in 0..5u64 {
            for i in 0..2u64 {
                let seq = h * 100 + i * 10;
                paths.push(put(
                    root,
                    "gw",
                    seq,
                    seq + 9,
                    NOW - (5 - h as i64) * HOUR_MS,
                ));
            }
        }
        let total: u64 = paths.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        let newest_half: u64 = paths[5..]
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        c.max_bytes = Some(newest_half);
        let r = run_pass(&c, NOW).unwrap();
        assert_eq!(r.pruned_objects, 5);
        assert_eq!(r.bytes, newest_half);
        assert_eq!(r.pruned_bytes, total - newest_half);
        assert!(paths[..5].iter().all(|p| !p.exists()));
        assert!(paths[5..].iter().all(|p| p.exists()));
        // The two oldest hours were emptied and are gone; the half-pruned one stays.
        assert!(!paths[0].parent().unwrap().exists());
        assert!(!paths[2].parent().unwrap().exists());
        assert!(paths[4].parent().unwrap().exists());
        // Under the limit: nothing more goes.
        assert_eq!(run_pass(&c, NOW).unwrap().pruned_objects, 0);
    }

    #[test]
    fn a_missing_archive_is_an_empty_one() {
        let tmp = tempfile::tempdir().unwrap();
        let r = run_pass(&cfg(&tmp.path().join("not-yet")), NOW).unwrap();
        assert_eq!(r, PassReport::default());
    }
}
