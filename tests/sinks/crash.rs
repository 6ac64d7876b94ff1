//! kill -9 of the real binary while batches are in flight to every kind of
//! sink: after the restart every acknowledged record reaches every sink.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::analytics::Analytics;
use crate::broker::Mosquitto;
use crate::helpers::{
    archived_keys, free_port, record_keys, spawn_gateway_binary, telemetry, wait_until,
};
use crate::kafka::{keys_of, Tansu};
use crate::mqtt::{cloud_subscriber, received};
use crate::s3::Moto;

#[test]
fn after_kill_9_with_batches_in_flight_every_sink_gets_every_acknowledged_record() {
    let tmp = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(tmp.path());
    tansu.create_topic("telemetry");
    let moto = Moto::start();
    moto.create_bucket("lake");
    let api = Analytics::start();
    let cloud = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let sub = cloud_subscriber(cloud.port, tmp.path());
    std::fs::write(tmp.path().join("key"), "test").unwrap();
    let archive = tmp.path().join("archive");
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nurl = \"off\"\n\
             [sinks.archive]\nkind = \"s3\"\nurl = \"file://{archive}\"\nbatch_max_wait_ms = 20\n\
             [sinks.lake]\nkind = \"s3\"\nurl = \"s3://lake/edge\"\nendpoint = \"{s3}\"\naccess_key_id_file = \"{key}\"\nsecret_access_key_file = \"{key}\"\nbatch_max_wait_ms = 50\n\
             [sinks.api]\nkind = \"http\"\nurl = \"{api}\"\nbatch_max_wait_ms = 20\n\
             [sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{cloud}\"\ntopic_prefix = \"cloud\"\nbatch_max_wait_ms = 20\n\
             [sinks.events]\nkind = \"kafka\"\nbrokers = \"{kafka}\"\ntopic = \"telemetry\"\nbatch_max_wait_ms = 20\n",
            archive = archive.display(),
            s3 = moto.endpoint(),
            key = tmp.path().join("key").display(),
            api = api.url(),
            cloud = cloud.port,
            kafka = tansu.brokers(),
        ),
    )
    .unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let cfg = config.display().to_string();
    let mut gw = spawn_gateway_binary(&data, port, &["--config", &cfg], &[]);

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let sender = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .build();
            for i in 0..3000 {
                let res = agent
                    .post(&format!("http://127.0.0.1:{port}/ingest/dev-{}", i % 5))
                    .set("Content-Type", "application/json")
                    .send_string(&telemetry(&format!("c{i}"), 1.0));
                match res {
                    Ok(r) if r.status() == 202 => {
                        acked.lock().unwrap().push(format!("dev-{}:c{i}", i % 5))
                    }
                    Ok(r) => panic!("unexpected {}", r.status()),
                    Err(_) => return,
                }
            }
        })
    };
    wait_until("records flowing", Duration::from_secs(60), || {
        acked.lock().unwrap().len() >= 800
    });
    gw.kill().expect("SIGKILL");
    gw.wait().unwrap();
    sender.join().unwrap();
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let mut gw = spawn_gateway_binary(&data, port, &["--config", &cfg], &[]);

    let keys = |v: Vec<String>| v.into_iter().collect::<HashSet<String>>();
    let check = |name: &str, have: HashSet<String>| {
        let missing = acked.difference(&have).count();
        assert_eq!(
            missing,
            0,
            "sink {name} lost {missing} of {} acknowledged records",
            acked.len()
        );
    };
    wait_until(
        "every sink has every record",
        Duration::from_secs(90),
        || {
            let archived = archived_keys(&archive);
            let posted = api.accepted_keys();
            let cloud = keys(received(&sub).into_iter().map(|(_, k)| k).collect());
            acked.is_subset(&archived) && acked.is_subset(&posted) && acked.is_subset(&cloud)
        },
    );
    let lake = || record_keys(moto.dump("lake").iter().map(|(_, _, r)| r));
    wait_until(
        "the S3 sink has every record",
        Duration::from_secs(60),
        || acked.is_subset(&lake()),
    );
    check("lake", lake());
    // The topic may hold more than the acknowledged records (records committed
    // whose 202 was lost in the kill): read until every acknowledged key is
    // there, not until a count is reached.
    let kafka_keys = || keys_of(&tansu.dump("telemetry", usize::MAX, Duration::from_secs(4)));
    let mut got = kafka_keys();
    for _ in 0..10 {
        if acked.is_subset(&got) {
            break;
        }
        got = kafka_keys();
    }
    check("events", got);
    gw.kill().unwrap();
    gw.wait().unwrap();
}
