//! `powercut-fs MOUNTPOINT [--status FILE]`: mounts an empty [`powercut_fs`]
//! filesystem at MOUNTPOINT (an existing directory; needs root and
//! `/dev/fuse`) and serves it until SIGTERM, SIGINT or SIGHUP, which unmount
//! it (lazily if it is busy) and exit 0.
//!
//! - `SIGUSR1`: a power cut (everything not made durable by fsync is
//!   forgotten; see the library's documentation).
//! - `SIGUSR2`: only rewrite the status (fresh counters).
//! - `--status FILE` (put it outside the mount): rewritten atomically (temp
//!   file + rename) once mounted and after each cut, one JSON object:
//!   `{"pid":..,"mounted":true,"cuts":N,"fsyncs":..,"fsyncdirs":..,"files":..,
//!   "dirs":..,"bytes":..,"last_cut":{"dropped":..,"kept":..,"reverted":..,
//!   "stale_handles":..,"dropped_paths":[..],"reverted_paths":[..]}}` (up to 8
//!   paths each, relative to the mount). A cut is complete when `cuts` has
//!   gone up.
//!
//! The same lines go to stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use powercut_fs::Stats;

const USAGE: &str = "usage: powercut-fs MOUNTPOINT [--status FILE]\n\
    SIGUSR1 = power cut (unsynced writes, creations, renames, unlinks are lost); \
    SIGUSR2 = rewrite the status; SIGTERM/SIGINT/SIGHUP = unmount and exit";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut mountpoint = None;
    let mut status = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--status") => match args.next() {
                Some(f) => status = Some(PathBuf::from(f)),
                None => return usage("--status needs a file"),
            },
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Some(a) if a.starts_with('-') => return usage(&format!("unknown option {a}")),
            _ if mountpoint.is_none() => mountpoint = Some(PathBuf::from(arg)),
            _ => return usage("one mount point only"),
        }
    }
    let Some(mountpoint) = mountpoint else {
        return usage("no mount point");
    };
    match run(&mountpoint, status.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("powercut-fs: {}: {e}", mountpoint.display());
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("powercut-fs: {msg}\n{USAGE}");
    ExitCode::from(2)
}

/// The signals this program waits for, blocked in every thread (the FUSE
/// thread inherits the mask) so that only `sigtimedwait` receives them.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
        ] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

fn run(mountpoint: &Path, status: Option<&Path>) -> std::io::Result<()> {
    let set = signal_set();
    // SAFETY: blocks signals of this (still only) thread; `set` is initialised.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let mounted = powercut_fs::mount(mountpoint)?;
    let controller = mounted.controller();
    report(status, &controller.stats(), true)?;
    loop {
        let timeout = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: waits for a signal of `set`; no memory is shared.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        match sig {
            libc::SIGUSR1 => {
                controller.cut();
                report(status, &controller.stats(), true)?;
            }
            libc::SIGUSR2 => report(status, &controller.stats(), true)?,
            libc::SIGTERM | libc::SIGINT | libc::SIGHUP => break,
            _ => {
                if !mounted.is_alive() {
                    // Unmounted from outside (umount): nothing left to serve.
                    report(status, &controller.stats(), false)?;
                    return Ok(());
                }
            }
        }
    }
    let stats = controller.stats();
    mounted.unmount()?;
    report(status, &stats, false)
}

fn report(status: Option<&Path>, s: &Stats, mounted: bool) -> std::io::Result<()> {
    let c = &s.last_cut;
    let line = format!(
        "{{\"pid\":{},\"mounted\":{mounted},\"cuts\":{},\"fsyncs\":{},\"fsyncdirs\":{},\
         \"files\":{},\"dirs\":{},\"bytes\":{},\"last_cut\":{{\"dropped\":{},\"kept\":{},\
         \"reverted\":{},\"stale_handles\":{},\"dropped_paths\":{},\"reverted_paths\":{}}}}}",
        std::process::id(),
        s.cuts,
        s.fsyncs,
        s.fsyncdirs,
        s.files,
        s.dirs,
        s.bytes,
        c.dropped,
        c.kept,
        c.reverted,
        c.stale_handles,
        json_strings(&c.dropped_paths),
        json_strings(&c.reverted_paths),
    );
    eprintln!("powercut-fs: {line}");
    if let Some(path) = status {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, format!("{line}\n"))?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}

/// A JSON array of strings.
fn json_strings(items: &[String]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in item.chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push(']');
    out
}
