//! The `mqtt` sink against a second, real Mosquitto (the "cloud" broker).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::broker::Mosquitto;
use crate::helpers::{spawn_app, telemetry, wait_until};

pub use crate::broker::Subscriber;

/// A persistent-session subscriber to `cloud/#` on the cloud broker.
pub fn cloud_subscriber(port: u16, dir: &Path) -> Subscriber {
    Subscriber::start(port, dir, &["cloud/#"], &["-c", "-i", "cloud-sub"])
}

/// (topic, idempotency key) of everything the subscriber received.
pub fn received(sub: &Subscriber) -> Vec<(String, String)> {
    sub.messages()
        .into_iter()
        .filter_map(|(topic, payload)| {
            let v: serde_json::Value = serde_json::from_str(&payload).ok()?;
            Some((topic, v["idempotency_key"].as_str()?.to_string()))
        })
        .collect()
}

fn mqtt_sink(port: u16) -> String {
    format!(
        "[sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = \"cloud/edge\"\n\
         batch_max_wait_ms = 20\nretry_base_ms = 50\nretry_max_ms = 300\nretry_budget = 1000\npublish_timeout_ms = 5000\n"
    )
}

#[test]
fn the_mqtt_sink_publishes_every_record_to_the_cloud_broker_under_its_device_topic() {
    let tmp = tempfile::tempdir().unwrap();
    let cloud = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    let sub = cloud_subscriber(cloud.port, tmp.path());
    let app = spawn_app(&mqtt_sink(cloud.port));
    for i in 0..30 {
        let device = format!("dev-{}", i % 3);
        assert_eq!(
            app.post_json(&device, &telemetry(&format!("m{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until(
        "30 records at the cloud broker",
        Duration::from_secs(15),
        || {
            received(&sub)
                .iter()
                .map(|(_, k)| k.clone())
                .collect::<HashSet<_>>()
                .len()
                == 30
        },
    );
    for (topic, key) in received(&sub) {
        let device = key.split(':').next().unwrap();
        assert_eq!(topic, format!("cloud/edge/{device}/telemetry"));
    }
    wait_until("acked in the WAL", Duration::from_secs(5), || {
        app.metric(r#"gateway_sink_records_total{outcome="ok",sink="cloud"}"#) >= 30.0
    });
}

#[test]
fn records_wait_in_the_wal_while_the_cloud_broker_is_down_and_arrive_after_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cloud = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
    // Register the subscriber's persistent session, then take the broker away.
    drop(cloud_subscriber(cloud.port, tmp.path()));
    cloud.stop();
    let app = spawn_app(&mqtt_sink(cloud.port));
    for i in 0..20 {
        assert_eq!(
            app.post_json("dev-1", &telemetry(&format!("m{i}"), 1.0))
                .status,
            202
        );
    }
    wait_until("retries while down", Duration::from_secs(10), || {
        app.metric(r#"gateway_sink_publish_total{outcome="retry",sink="cloud"}"#) >= 2.0
    });
    assert_eq!(app.metric(r#"gateway_sink_up{sink="cloud"}"#), 0.0);
    cloud.restart();
    let sub = cloud_subscriber(cloud.port, tmp.path());
    let want: HashSet<String> = (0..20).map(|i| format!("dev-1:m{i}")).collect();
    wait_until(
        "everything delivered after the broker returned",
        Duration::from_secs(20),
        || {
            received(&sub)
                .into_iter()
                .map(|(_, k)| k)
                .collect::<HashSet<_>>()
                == want
        },
    );
}
