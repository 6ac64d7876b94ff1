//! A real Mosquitto for the tests: started on a free loopback port with its
//! own config, persistence and (optionally) throwaway certificates; stopped
//! by PID.

use std::net::TcpStream;

use crate::helpers::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Mosquitto process. Dropping it kills it.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    conf: PathBuf,
}

impl Mosquitto {
    /// `listener_extra` goes right after the `listener` line (TLS settings);
    /// `extra` at the end (ACLs, limits).
    pub fn start(dir: &Path, listener_extra: &str, extra: &str) -> Mosquitto {
        let port = free_port();
        let data = dir.join("mosquitto-data");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "# test broker\n\
                 user root\n\
                 per_listener_settings false\n\
                 persistence true\n\
                 persistence_location {}/\n\
                 autosave_interval 1\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n\
                 max_queued_messages 0\n\
                 max_inflight_messages 100\n\
                 listener {port} 127.0.0.1\n\
                 {listener_extra}\n\
                 {extra}\n",
                data.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            child: None,
            port,
            dir: dir.to_path_buf(),
            conf,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .unwrap();
        // Debian puts it in /usr/sbin, which is not on every PATH.
        let bin = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed (scripts/deps.sh test)");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id (to stop it with kill -STOP).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker gracefully (it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same persistence.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A throwaway CA with a server certificate for 127.0.0.1/localhost and
/// client certificates whose CN is the client's name, made by the same
/// script operators use (`certs/gen-dev-certs.sh`, `make certs`).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path, clients: &[&str]) -> Certs {
        let dir = dir.join("certs");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs/gen-dev-certs.sh");
        let out = Command::new(script)
            .arg(&dir)
            .args(clients)
            .env("CERT_DAYS", "2")
            .env_remove("SERVER_SANS")
            .output()
            .expect("certs/gen-dev-certs.sh runs");
        assert!(
            out.status.success(),
            "gen-dev-certs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Certs { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// Mosquitto listener lines: TLS with required client certificates whose CN is the user name.
    pub fn mtls_listener(&self) -> String {
        format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
            self.path("ca.crt"),
            self.path("server.crt"),
            self.path("server.key")
        )
    }
}

/// `mosquitto_pub -h 127.0.0.1 -p PORT -q 1 -t TOPIC` plus `args`.
fn mosquitto_pub_cmd(port: u16, topic: &str, args: &[&str]) -> Command {
    let mut c = Command::new("mosquitto_pub");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
    ])
    .args(args);
    c
}

/// Publishes at QoS 1 to `topic` on the broker at `port` with the extra
/// `args` (`-m …`, `-f …`, TLS, `-V mqttv5`); returns (success, stderr).
pub fn mosquitto_pub(port: u16, topic: &str, args: &[&str]) -> (bool, String) {
    let out = mosquitto_pub_cmd(port, topic, args)
        .output()
        .expect("mosquitto_pub is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Publishes `lines` (one message each) at QoS 1 from one client with
/// `mosquitto_pub -l`; true when the broker acknowledged them all.
pub fn publish_lines(port: u16, topic: &str, lines: &[String], extra: &[&str]) -> bool {
    use std::io::Write;
    let mut child = mosquitto_pub_cmd(port, topic, &[&["-l"], extra].concat())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub is installed");
    {
        let mut stdin = child.stdin.take().unwrap();
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
    }
    child.wait().map(|s| s.success()).unwrap_or(false)
}

/// `mosquitto_sub -v` at QoS 1 on `topics` (plus `args`), writing what
/// arrives to a file of its own; killed when dropped.
pub struct Subscriber {
    child: Child,
    out: PathBuf,
}

impl Subscriber {
    pub fn start(port: u16, dir: &Path, topics: &[&str], args: &[&str]) -> Subscriber {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let out = dir.join(format!("received-{}.txt", N.fetch_add(1, Ordering::SeqCst)));
        let file = std::fs::File::create(&out).unwrap();
        let mut c = Command::new("mosquitto_sub");
        c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-v"]);
        for t in topics {
            c.args(["-t", t]);
        }
        let child = c
            .args(args)
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub is installed");
        std::thread::sleep(Duration::from_millis(300));
        Subscriber { child, out }
    }

    /// (topic, payload) of everything received so far.
    pub fn messages(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (topic, payload) = l.split_once(' ')?;
                Some((topic.to_string(), payload.to_string()))
            })
            .collect()
    }

    /// Waits until a message on `topic` arrives; returns its payload as JSON.
    pub fn wait_json(&self, topic: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, p)) = self.messages().into_iter().find(|(t, _)| t == topic) {
                return serde_json::from_str(&p)
                    .unwrap_or_else(|e| panic!("{topic}: not JSON ({e}): {p}"));
            }
            assert!(
                Instant::now() < deadline,
                "nothing on {topic} within {timeout:?}; got {:?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
