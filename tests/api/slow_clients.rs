//! Slow and idle clients: a body that trickles in, headers that trickle in,
//! and hundreds of connections that say nothing. Each gets cut within
//! `http.request_timeout`, and a valid client keeps being served while the
//! attack runs (its latency is printed; the budget is a benchmark, not
//! asserted here).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::{spawn_app, telemetry, TestApp};

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or 30 s); returns what came.
fn read_until_closed(s: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

/// Sends `head`, then `trickle` one byte every 200 ms from another thread
/// until the server closes.
fn trickling(app: &TestApp, head: String, trickle: Vec<u8>) -> (String, Duration) {
    let mut s = TcpStream::connect(addr(app)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    let started = Instant::now();
    std::thread::spawn(move || {
        for b in trickle {
            std::thread::sleep(Duration::from_millis(200));
            if w.write_all(&[b]).is_err() {
                return;
            }
        }
    });
    let (text, _) = read_until_closed(&mut s);
    (text, started.elapsed())
}

#[test]
fn a_trickling_body_or_header_is_cut_at_the_request_timeout() {
    let app = spawn_app("[http]\nrequest_timeout = \"2s\"\n");
    let body = telemetry("slow", 1.0).into_bytes();
    let (text, took) = trickling(
        &app,
        format!(
            "POST /ingest/dev-1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
        body,
    );
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert!(took < Duration::from_secs(6), "cut after {took:?}");

    let (text, took) = trickling(
        &app,
        "POST /ingest/dev-1 HTTP/1.1\r\nHost: x\r\n".into(),
        b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
    );
    assert!(
        took < Duration::from_secs(6),
        "headers held for {took:?}: {text}"
    );
    // Nothing of either was stored.
    assert_eq!(
        app.metric(r#"gateway_ingest_records_total{outcome="accepted",source="http"}"#),
        0.0
    );
}

#[test]
fn valid_clients_are_served_while_slow_and_idle_clients_attack() {
    let app = spawn_app("[http]\nrequest_timeout = \"2s\"\n");
    let a = addr(&app);
    // 300 idle connections and 50 slow bodies, renewed while the test runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers: Vec<_> = (0..2)
        .map(|kind| {
            let (a, stop) = (a.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = if kind == 0 { 300 } else { 50 };
                    conns.retain(|c: &TcpStream| c.peek(&mut [0u8; 1]).is_err());
                    while conns.len() < n {
                        let Ok(mut c) = TcpStream::connect(&a) else { break };
                        c.set_nonblocking(true).unwrap();
                        if kind == 1 {
                            let _ = c.write_all(b"POST /ingest/dev-9 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{");
                        }
                        conns.push(c);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut latencies = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        let r = app.post_json("dev-1", &telemetry(&format!("v{i}"), 1.0));
        latencies.push(t.elapsed());
        assert_eq!(
            r.status, 202,
            "valid request {i} during the attack: {}",
            r.text
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in attackers {
        t.join().unwrap();
    }
    latencies.sort();
    println!(
        "valid client during the attack: p50 {:?}, p99 {:?}, max {:?}",
        latencies[100], latencies[197], latencies[199]
    );
}
