//! The `powercut-fs` binary, mounted for real: what survives a cut, and the
//! proof that it is strict enough to catch a program that acknowledges
//! before fsync (SQLite with `synchronous=OFF` loses committed rows; with
//! `synchronous=FULL`, the gateway's setting, it loses none).
//!
//! Needs `/dev/fuse` and root (mount(2)); skipped with a message when
//! `/dev/fuse` is missing.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "POWERCUT_SQLITE_CHILD";

fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/fuse is missing: the powercut-fs tests need FUSE");
    false
}

/// One `powercut-fs` process with its mount in a temp dir.
struct Fs {
    child: Child,
    dir: tempfile::TempDir,
    cuts: u64,
}

impl Fs {
    fn mount() -> Fs {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_powercut-fs"))
            .arg(&mnt)
            .arg("--status")
            .arg(dir.path().join("status.json"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start powercut-fs");
        let mut fs = Fs {
            child,
            dir,
            cuts: 0,
        };
        fs.wait_status("\"mounted\":true");
        fs
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt().join(name)
    }

    fn status(&self) -> String {
        fs::read_to_string(self.dir.path().join("status.json")).unwrap_or_default()
    }

    fn wait_status(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.status().contains(want) {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("powercut-fs exited ({st}) before '{want}'");
            }
            assert!(
                Instant::now() < deadline,
                "no '{want}' in {}",
                self.status()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A power cut; returns once it is complete.
    fn cut(&mut self) {
        self.signal(libc::SIGUSR1);
        self.cuts += 1;
        self.wait_status(&format!("\"cuts\":{},", self.cuts));
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().unwrap();
        if !std::thread::panicking() {
            assert!(status.success(), "powercut-fs exited with {status}");
            assert!(
                !fs::read_to_string("/proc/self/mounts")
                    .unwrap()
                    .contains(self.mnt().to_str().unwrap()),
                "still mounted after SIGTERM"
            );
        }
    }
}

fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

fn write_file(path: &Path, data: &[u8], fsync: bool) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    if fsync {
        f.sync_all().unwrap();
    }
}

#[test]
fn unsynced_data_is_gone_after_a_cut() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::mount();
    let (a, b) = (fs.path("a"), fs.path("b"));
    write_file(&a, b"v1", true);
    write_file(&b, b"never synced", false);
    fsync_dir(&fs.mnt()); // both names are durable, only a's data is
    let mut f = OpenOptions::new().append(true).open(&a).unwrap();
    f.write_all(b" + unsynced tail").unwrap();
    drop(f);
    assert_eq!(fs::read(&a).unwrap(), b"v1 + unsynced tail");
    fs.cut();
    assert_eq!(fs::read(&a).unwrap(), b"v1");
    assert_eq!(
        fs::read(&b).unwrap(),
        b"",
        "b's name survived, its data did not"
    );
}

#[test]
fn fsynced_data_of_a_file_whose_directory_entry_was_synced_survives() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::mount();
    let dir = fs.path("d");
    fs::create_dir(&dir).unwrap();
    fsync_dir(&fs.mnt());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    write_file(&dir.join("f"), &data, true);
    fsync_dir(&dir);
    fs.cut();
    assert_eq!(fs::read(dir.join("f")).unwrap(), data);
    // And again: a second cut with nothing new changes nothing.
    fs.cut();
    assert_eq!(fs::read(dir.join("f")).unwrap(), data);
}

#[test]
fn a_file_fsynced_but_whose_directory_was_not_is_gone() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::mount();
    write_file(&fs.path("f"), b"data fsynced, name not", true);
    let dir = fs.path("d"); // a directory whose own name was never synced
    fs::create_dir(&dir).unwrap();
    write_file(&dir.join("g"), b"synced", true);
    fsync_dir(&dir);
    fs.cut();
    assert_eq!(
        fs::read(fs.path("f")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(!dir.exists(), "d's entry in the root was never synced");
}

#[test]
fn a_rename_or_unlink_not_followed_by_a_directory_fsync_is_undone() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::mount();
    let (cfg, tmp, gone) = (
        fs.path("cfg.json"),
        fs.path("cfg.json.tmp"),
        fs.path("gone"),
    );
    write_file(&cfg, b"{\"v\":1}", true);
    write_file(&gone, b"still here", true);
    fsync_dir(&fs.mnt());
    // The atomic-replace pattern without its last step (fsync of the directory).
    write_file(&tmp, b"{\"v\":2}", true);
    fs::rename(&tmp, &cfg).unwrap();
    fs::remove_file(&gone).unwrap();
    fs.cut();
    assert_eq!(
        fs::read(&cfg).unwrap(),
        b"{\"v\":1}",
        "the rename was undone"
    );
    assert!(
        !tmp.exists(),
        "tmp was created after the last directory sync"
    );
    assert_eq!(
        fs::read(&gone).unwrap(),
        b"still here",
        "the unlink was undone"
    );
    // With the last step, both stick.
    write_file(&tmp, b"{\"v\":3}", true);
    fs::rename(&tmp, &cfg).unwrap();
    fs::remove_file(&gone).unwrap();
    fsync_dir(&fs.mnt());
    fs.cut();
    assert_eq!(fs::read(&cfg).unwrap(), b"{\"v\":3}");
    assert!(!tmp.exists() && !gone.exists());
}

#[test]
fn handles_open_at_a_cut_are_stale_and_unlinked_open_files_live_until_closed() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::mount();
    let path = fs.path("f");
    let mut f = File::create(&path).unwrap();
    f.write_all(b"abc").unwrap();
    f.sync_all().unwrap();
    fsync_dir(&fs.mnt());
    // Unlinked while open: still readable and writable through the handle.
    let mut reader = File::open(&path).unwrap();
    fs::remove_file(&path).unwrap();
    f.write_all(b"def").unwrap();
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    assert_eq!(text, "abcdef");
    fs.cut();
    let err = f.write_all(b"x").and_then(|_| f.sync_all()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop((f, reader));
    // The unlink was never synced: the file is back with its synced data.
    assert_eq!(fs::read(&path).unwrap(), b"abc");
}

#[test]
fn sqlite_wal_survives_cuts_with_synchronous_full_and_loses_rows_with_off() {
    if !fuse_available() {
        return;
    }
    let mut fs = Fs::mount();
    let dir = fs.path("data");
    fs::create_dir(&dir).unwrap();
    fsync_dir(&fs.mnt()); // installed once, like a package's data dir
    let acks = fs.dir.path().join("acks.txt");

    // "Acks before fsync": every commit is acknowledged, none is fsynced.
    let (acked, present) = sqlite_round(&mut fs, &dir.join("off.db"), "OFF", &acks);
    let lost = acked.len() - acked.iter().filter(|i| present.contains(i)).count();
    eprintln!(
        "synchronous=OFF: {} acknowledged, {lost} lost at the cut",
        acked.len()
    );
    assert!(
        lost > 0,
        "the filesystem kept unsynced commits: not strict enough"
    );

    // The gateway's setting: every acknowledged commit survives, 3 cuts in a row.
    for round in 0..3 {
        let (acked, present) = sqlite_round(&mut fs, &dir.join("full.db"), "FULL", &acks);
        let missing: Vec<_> = acked.iter().filter(|i| !present.contains(i)).collect();
        eprintln!(
            "synchronous=FULL round {round}: {} acknowledged, {} lost",
            acked.len(),
            missing.len()
        );
        assert!(missing.is_empty(), "lost acknowledged rows {missing:?}");
    }
}

/// A child process commits rows to `db` (WAL mode, `synchronous=mode`) and
/// acknowledges each after its commit returns; it is killed with SIGKILL,
/// the power is cut, and the rows still there are read back. Returns
/// (acknowledged ids, ids in the table).
fn sqlite_round(fs: &mut Fs, db: &Path, mode: &str, acks: &Path) -> (Vec<i64>, Vec<i64>) {
    let _ = fs::remove_file(acks);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "sqlite_writer_child", "--nocapture"])
        .env(
            CHILD_ENV,
            format!("{}\n{mode}\n{}", db.display(), acks.display()),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let acked = loop {
        let acked = read_acks(acks);
        if acked.len() >= 300 {
            break acked;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the SQLite writer exited ({st})");
        }
        assert!(
            Instant::now() < deadline,
            "only {} rows acknowledged in 60 s",
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let acked_final = read_acks(acks);
    assert!(acked_final.len() >= acked.len());
    fs.cut();
    let conn = rusqlite::Connection::open(db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok", "{mode}: the database is damaged after the cut");
    let present = match conn.prepare("SELECT id FROM t") {
        Ok(mut stmt) => stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<Vec<i64>, _>>()
            .unwrap(),
        Err(_) => Vec::new(), // the table itself was lost
    };
    (acked_final, present)
}

fn read_acks(path: &Path) -> Vec<i64> {
    let text = fs::read_to_string(path).unwrap_or_default();
    // A line cut short by the SIGKILL has no newline yet: not an ack.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().map(|l| l.parse().unwrap()).collect()
}

/// The SQLite writer of `sqlite_round`, run in a child process (this test
/// binary re-executed); does nothing unless POWERCUT_SQLITE_CHILD is set.
#[test]
#[ignore = "a helper process of sqlite_wal_survives_cuts_..., not a test"]
fn sqlite_writer_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.lines();
    let (db, mode, acks) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    // The table is created durably whatever the mode under test.
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, body BLOB)")
        .unwrap();
    conn.pragma_update(None, "synchronous", mode).unwrap();
    let mut ack = OpenOptions::new()
        .create(true)
        .append(true)
        .open(acks)
        .unwrap();
    let start: i64 = conn
        .query_row("SELECT COALESCE(MAX(id), 0) FROM t", [], |r| r.get(0))
        .unwrap();
    for id in start + 1.. {
        conn.execute("INSERT INTO t(id, body) VALUES(?1, zeroblob(500))", [id])
            .unwrap();
        // Autocommit: the commit has returned. Acknowledge.
        writeln!(ack, "{id}").unwrap();
    }
}
