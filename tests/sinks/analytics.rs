//! A small analytics API for the HTTP sink tests: the sink's real
//! counterpart, told by the test to accept, fail with a status, or hang.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// 200.
    Accept,
    /// This status, with an optional `Retry-After`.
    Fail(u16, Option<u64>),
    /// Read the request and never answer.
    Hang,
    /// 200 after this long (a slow API).
    Slow(Duration),
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The body as received (compressed when `content-encoding` says so).
    pub raw: Vec<u8>,
    pub answered: Option<u16>,
}

#[derive(Clone)]
pub struct Analytics {
    pub port: u16,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Analytics {
    pub fn start() -> Analytics {
        Self::start_on(0)
    }

    pub fn start_on(port: u16) -> Analytics {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let a = Analytics {
            port,
            mode: Arc::new(Mutex::new(Mode::Accept)),
            seen: Arc::default(),
        };
        let server = a.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = server.clone();
                std::thread::spawn(move || s.serve(conn));
            }
        });
        a
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/ingest", self.port)
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Idempotency keys of the records in accepted requests.
    /// The distinct idempotency keys of the records the API accepted.
    pub fn accepted_keys(&self) -> std::collections::HashSet<String> {
        self.accepted_record_keys().into_iter().collect()
    }

    pub fn accepted_record_keys(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.answered == Some(200))
            .flat_map(|s| s.body.lines().map(str::to_string).collect::<Vec<_>>())
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(&l).unwrap()["idempotency_key"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    fn serve(&self, conn: TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut conn = conn;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let mode = self.mode.lock().unwrap().clone();
            let answered = match &mode {
                Mode::Accept | Mode::Slow(_) => Some(200),
                Mode::Fail(s, _) => Some(*s),
                Mode::Hang => None,
            };
            self.seen.lock().unwrap().push(Seen {
                at: Instant::now(),
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                raw: body,
                answered,
            });
            match mode {
                Mode::Hang => {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                Mode::Accept => {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
                Mode::Slow(d) => {
                    std::thread::sleep(d);
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
                Mode::Fail(status, retry_after) => {
                    let ra = retry_after
                        .map(|s| format!("retry-after: {s}\r\n"))
                        .unwrap_or_default();
                    let _ = conn.write_all(
                        format!("HTTP/1.1 {status} X\r\n{ra}content-length: 0\r\n\r\n").as_bytes(),
                    );
                }
            }
        }
    }
}
