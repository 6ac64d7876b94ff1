//! systemd's notify protocol, without libsystemd: `READY=1` once the
//! gateway serves, and `WATCHDOG=1` every half `WatchdogSec` while the WAL
//! writer is alive (a wedged writer means no ack for anything: systemd then
//! restarts the service). A datagram to `$NOTIFY_SOCKET`; nothing happens
//! when the variable is not set (not under systemd, or `Type=simple`).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn socket_addr() -> Option<std::os::unix::net::SocketAddr> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).ok()
    } else {
        std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(&path)).ok()
    }
}

/// Sends `state` (e.g. `READY=1`); false when there is no socket or it failed.
pub fn notify(state: &str) -> bool {
    let Some(addr) = socket_addr() else {
        return false;
    };
    match UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), &addr)) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot notify systemd");
            false
        }
    }
}

/// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), when systemd
/// asked this process for it.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_watchdog_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        // SAFETY: tests in this binary do not read these variables concurrently.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", &path);
            std::env::set_var("WATCHDOG_USEC", "4000000");
            std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        }
        assert!(notify("READY=1"));
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(2)));
        unsafe {
            std::env::set_var("WATCHDOG_PID", "1");
        }
        assert_eq!(watchdog_interval(), None, "another process's watchdog");
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
        }
        assert!(!notify("READY=1"));
    }
}
