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

/// A TCP proxy between the gateway and the cloud broker that can cut the
/// connection (an upstream outage) while the broker, its sessions and the
/// subscriber stay up.
struct Proxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, c) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if !u.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut g = c.lock().unwrap();
                g.push(client.try_clone().unwrap());
                g.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, up, conns }
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The outage of the issue that measured it: live traffic, the upstream
/// link goes away while a backlog builds up, then comes back. Everything
/// arrives, and the cloud sees at most 1 % of the backlog twice: the sink
/// resumes its session and its batch instead of publishing the batch again
/// (the old sink republished whole batches: 500 of 4,000 in this test).
#[test]
fn after_an_upstream_outage_everything_arrives_with_at_most_one_percent_duplicates() {
    for version in ["3.1.1", "5"] {
        let tmp = tempfile::tempdir().unwrap();
        let cloud = Mosquitto::start(tmp.path(), "allow_anonymous true", "");
        let sub = cloud_subscriber(cloud.port, tmp.path());
        let proxy = Proxy::start(cloud.port);
        let app = spawn_app(&format!(
            "[sinks.cloud]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\ntopic_prefix = \"cloud/edge\"\n\
             version = \"{version}\"\nretry_base_ms = 50\nretry_max_ms = 300\nretry_budget = 1000\npublish_timeout_ms = 3000\n",
            proxy.port
        ));
        let distinct = || {
            received(&sub)
                .into_iter()
                .map(|(_, k)| k)
                .collect::<HashSet<_>>()
                .len()
        };
        // Live traffic, 100 records every 50 ms, through the whole run.
        let (total, cut_at, restore_at) = (6000, 1000, 5000);
        for b in (0..total).step_by(100) {
            if b == cut_at {
                // Upstream, and acknowledged back to the gateway: a PUBACK
                // still on its way when the link goes is a duplicate that
                // QoS 1 allows, and not what this test measures (under load
                // that window held a whole batch of 100).
                wait_until("the live records upstream", Duration::from_secs(15), || {
                    distinct() >= cut_at
                        && app.metric(r#"gateway_sink_records_total{outcome="ok",sink="cloud"}"#)
                            >= cut_at as f64
                });
                proxy.cut();
            }
            if b == restore_at {
                proxy.restore();
            }
            let body: Vec<String> = (b..b + 100)
                .map(|i| telemetry(&format!("m{i}"), 1.0))
                .collect();
            let r = app.post_json("dev-1", &format!("[{}]", body.join(",")));
            assert_eq!(r.status, 202, "{}", r.text);
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_until("every record upstream", Duration::from_secs(60), || {
            distinct() == total
        });
        std::thread::sleep(Duration::from_millis(500));
        let dups = received(&sub).len() - total;
        let backlog = restore_at - cut_at;
        eprintln!("MQTT {version}: {dups} duplicates after an outage with a backlog of {backlog}");
        assert!(
            dups * 100 <= backlog,
            "MQTT {version}: {dups} duplicates of a {backlog}-record backlog"
        );
    }
}
