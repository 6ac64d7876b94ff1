//! kill -9 of the real binary: nothing acknowledged is lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_actors::wal::{Wal, WalConfig};

use crate::helpers::{archived_keys, free_port, spawn_gateway_binary, telemetry, wait_until};

#[test]
fn every_acknowledged_record_survives_kill_9_and_reaches_the_archive() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_gateway_binary(
        dir.path(),
        port,
        &["--gateway-id", "crash-test", "--mqtt-url", "off"],
        &[],
    );

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let url = format!("http://127.0.0.1:{port}/ingest/");
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (acked, url) = (acked.clone(), url.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(5))
                    .build();
                for i in 0..5000 {
                    let device = format!("dev-{t}");
                    let msg = format!("m{i}");
                    let res = agent
                        .post(&format!("{url}{device}"))
                        .set("Content-Type", "application/json")
                        .send_string(&telemetry(&msg, i as f64));
                    match res {
                        Ok(r) if r.status() == 202 => {
                            acked.lock().unwrap().push(format!("{device}:{msg}"))
                        }
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => return, // the gateway was killed
                    }
                }
            })
        })
        .collect();
    wait_until(
        "enough acknowledged records",
        Duration::from_secs(60),
        || acked.lock().unwrap().len() >= 2000,
    );
    child.kill().expect("SIGKILL"); // kill -9 in the middle of the stream
    child.wait().unwrap();
    for s in senders {
        s.join().unwrap();
    }
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(acked.len() >= 2000);

    let mut child = spawn_gateway_binary(
        dir.path(),
        port,
        &["--gateway-id", "crash-test", "--mqtt-url", "off"],
        &[],
    );
    let archive = dir.path().join("archive");
    let archived = || archived_keys(&archive);
    let mut missing = 0;
    for _ in 0..600 {
        let have = archived();
        missing = acked.difference(&have).count();
        if missing == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged records lost after kill -9",
        acked.len()
    );
}

/// SIGTERM is a clean stop: the acknowledgements the sinks' dispatchers
/// hold in memory (`wal.ack_flush`, here 10 s so that only the stop can
/// store them in time) go to disk, and a restart delivers nothing again.
#[test]
fn a_clean_stop_stores_the_acknowledgements_held_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_gateway_binary(
        dir.path(),
        port,
        &["--gateway-id", "stop-test", "--mqtt-url", "off"],
        &[("GATEWAY_WAL_ACK_FLUSH", "10s")],
    );
    for i in 0..5 {
        let status = ureq::post(&format!("http://127.0.0.1:{port}/ingest/dev-1"))
            .set("Content-Type", "application/json")
            .send_string(&telemetry(&format!("s{i}"), 1.0))
            .unwrap()
            .status();
        assert_eq!(status, 202);
    }
    let archive = dir.path().join("archive");
    wait_until("the archive has all five", Duration::from_secs(10), || {
        archived_keys(&archive).len() == 5
    });
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    let mut wal = Wal::open(WalConfig::new(dir.path().join("wal.db"), &["archive"])).unwrap();
    assert_eq!(
        wal.fetch("archive", 100, Duration::ZERO)
            .unwrap()
            .map(|b| b.records.len()),
        None,
        "delivered records are pending again after a clean stop"
    );
}
