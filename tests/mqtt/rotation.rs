//! MQTT client certificate rotation on the real binary: the gateway's
//! client certificate files are replaced while a device keeps publishing;
//! SIGHUP (and the `tls.reload` command) reconnect the ingest, the control
//! plane and the MQTT sink with the new certificate, and every record the
//! broker acknowledged to the device is stored exactly once and delivered.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::broker::{mosquitto_pub, Certs, Mosquitto, Subscriber};
use crate::helpers::{
    archived_records, free_port, record_keys, request, spawn_gateway_binary, telemetry, wait_until,
};

/// Client ids the broker saw connecting with certificate CN `cn`.
fn connections_as(broker: &Mosquitto, cn: &str) -> Vec<String> {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!("u'{cn}'")))
        .filter_map(|l| Some(l.split(" as ").nth(1)?.split(' ').next()?.to_string()))
        .collect()
}

#[test]
fn rotated_mqtt_client_certificates_are_used_after_sighup_and_nothing_is_lost_or_stored_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::generate(tmp.path(), &["gateway", "gateway-next", "device-1"]);
    let logging = "log_type notice\nconnection_messages true";
    let dirs = [tmp.path().join("ingest"), tmp.path().join("cloud")];
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let ingest = Mosquitto::start(&dirs[0], &certs.mtls_listener(), logging);
    let cloud = Mosquitto::start(&dirs[1], &certs.mtls_listener(), logging);
    let tls_args = |cn: &str| {
        vec![
            "--cafile".to_string(),
            certs.path("ca.crt"),
            "--cert".to_string(),
            certs.path(&format!("{cn}.crt")),
            "--key".to_string(),
            certs.path(&format!("{cn}.key")),
        ]
    };
    let device_tls = tls_args("device-1");
    let mut sub_args = vec!["-c", "-i", "rot-sub"];
    sub_args.extend(device_tls.iter().map(String::as_str));
    let sub = Subscriber::start(cloud.port, &dirs[1], &["cloud/#"], &sub_args);

    // The gateway's certificate lives in files of its own that get replaced.
    let (crt, key) = (tmp.path().join("gw.crt"), tmp.path().join("gw.key"));
    let install = |cn: &str| {
        std::fs::copy(certs.path(&format!("{cn}.crt")), &crt).unwrap();
        std::fs::copy(certs.path(&format!("{cn}.key")), &key).unwrap();
    };
    install("gateway");
    let data = tmp.path().join("data");
    let tls = format!(
        "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        certs.path("ca.crt"),
        crt.display(),
        key.display()
    );
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = \"edge-rot\"\n\
             [mqtt]\nurl = \"mqtts://127.0.0.1:{}\"\nclient_id = \"gw-rot\"\n{tls}\
             [sinks.archive]\nkind = \"s3\"\nurl = \"file://{}\"\nbatch_max_wait_ms = 20\n\
             [sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtts://127.0.0.1:{}\"\nclient_id = \"gw-rot-sink\"\n\
             topic_prefix = \"cloud\"\nbatch_max_wait_ms = 20\n{tls}",
            ingest.port,
            data.join("archive").display(),
            cloud.port,
        ),
    )
    .unwrap();
    let port = free_port();
    let gw = spawn_gateway_binary(&data, port, &["--config", config.to_str().unwrap()], &[]);
    wait_until(
        "ingest and sink connected as 'gateway'",
        Duration::from_secs(20),
        || {
            connections_as(&ingest, "gateway").contains(&"gw-rot".to_string())
                && connections_as(&cloud, "gateway").contains(&"gw-rot-sink".to_string())
        },
    );

    // A device keeps publishing; what the broker acked is in `acked`.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let device = {
        let (stop, acked, port) = (stop.clone(), acked.clone(), ingest.port);
        let args = tls_args("device-1");
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("rot-{i}");
                let body = telemetry(&id, f64::from(i));
                let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
                a.extend(["-V", "mqttv5", "-m", &body]);
                if mosquitto_pub(port, "devices/device-1/telemetry", &a).0 {
                    acked.lock().unwrap().push(format!("device-1:{id}"));
                }
                i += 1;
            }
        })
    };
    let sent = |n: usize| {
        let acked = acked.clone();
        wait_until(
            "the device keeps sending",
            Duration::from_secs(20),
            move || acked.lock().unwrap().len() >= n,
        );
    };
    sent(10);

    // Rotate: new files, SIGHUP.
    install("gateway-next");
    let pid = gw.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_until(
        "ingest, control plane and sink reconnected as 'gateway-next'",
        Duration::from_secs(20),
        || {
            let next = connections_as(&ingest, "gateway-next");
            next.contains(&"gw-rot".to_string())
                && next.contains(&"gw-rot-control".to_string())
                && connections_as(&cloud, "gateway-next").contains(&"gw-rot-sink".to_string())
        },
    );
    let n = acked.lock().unwrap().len();
    sent(n + 10);

    // A broken certificate is refused by tls.reload; the connections stay.
    let admin_token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let reload = || {
        request(
            ureq::post(&format!(
                "http://127.0.0.1:{port}/admin/commands/tls.reload"
            ))
            .set("Authorization", &format!("Bearer {}", admin_token.trim())),
            Some(""),
        )
    };
    let good = std::fs::read(&crt).unwrap();
    std::fs::write(&crt, "not a certificate").unwrap();
    let before = connections_as(&ingest, "gateway-next").len();
    let r = reload();
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.text.contains("the current certificate stays"),
        "{}",
        r.text
    );
    std::fs::write(&crt, good).unwrap();
    let r = reload();
    assert_eq!(r.status, 200, "{}", r.text);
    let parts: HashSet<String> = serde_json::from_str::<Value>(&r.text).unwrap()["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = ["mqtt.ingest", "mqtt.control", "sinks.cloud"]
        .map(String::from)
        .into();
    assert_eq!(parts, expected);
    let n = acked.lock().unwrap().len();
    sent(n + 10);
    stop.store(true, Ordering::Relaxed);
    device.join().unwrap();
    // The refused reload made no connection; the good one reconnected.
    assert!(connections_as(&ingest, "gateway-next").len() > before);

    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let archive = data.join("archive");
    wait_until(
        "every acked record archived",
        Duration::from_secs(30),
        || record_keys(&archived_records(&archive)).is_superset(&acked),
    );
    wait_until(
        "every acked record upstream",
        Duration::from_secs(30),
        || {
            let upstream: HashSet<String> = sub
                .messages()
                .iter()
                .filter_map(|(_, p)| serde_json::from_str::<Value>(p).ok())
                .filter_map(|v| Some(v["idempotency_key"].as_str()?.to_string()))
                .collect();
            upstream.is_superset(&acked)
        },
    );
    // Stored once each: redeliveries after the reconnects were deduplicated.
    let records = archived_records(&archive);
    assert_eq!(
        records.len(),
        record_keys(&records).len(),
        "a record was stored twice"
    );
    drop(gw);
}
