//! The data-dir lock: one process at a time owns a data dir's WAL.
//!
//! A running gateway holds an exclusive `flock` on `{data_dir}/gateway.lock`
//! (released by the kernel when the process dies, kill -9 included). The CLI
//! takes the same lock before it opens the WAL itself; when the lock is
//! held, it talks to the running gateway through the admin API instead, so
//! it never writes to a live WAL behind the gateway's back.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::Path;

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Either the lock, or the pid written by whoever holds it.
#[derive(Debug)]
pub enum LockState {
    /// This process owns the data dir now.
    Acquired(DataDirLock),
    /// Another process does (its pid, when readable).
    Held(Option<u32>),
}

/// Tries to lock `data_dir` (created if missing) without waiting.
pub fn try_lock(data_dir: &Path) -> std::io::Result<LockState> {
    // Durably: everything the gateway acknowledges lives below it.
    gateway_actors::durable::create_dir_all(data_dir)?;
    let path = data_dir.join("gateway.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Ok(LockState::Held(text.trim().parse().ok()));
        }
        return Err(err);
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.flush()?;
    Ok(LockState::Acquired(DataDirLock { _file: file }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = match try_lock(dir.path()).unwrap() {
            LockState::Acquired(l) => l,
            LockState::Held(_) => panic!("fresh dir is locked"),
        };
        match try_lock(dir.path()).unwrap() {
            LockState::Held(pid) => assert_eq!(pid, Some(std::process::id())),
            LockState::Acquired(_) => panic!("locked twice"),
        }
        drop(first);
        assert!(matches!(
            try_lock(dir.path()).unwrap(),
            LockState::Acquired(_)
        ));
    }
}
