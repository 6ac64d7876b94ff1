//! The Debian package and the systemd unit, for real: `cargo deb` builds the
//! package (from this test build's binary), `dpkg` installs it into a
//! minimal Debian bookworm root (debootstrap, cached by
//! `scripts/debian-root.sh`), `systemd-analyze verify` checks the unit, and
//! the installed binary runs in the root as the service user with the unit's
//! command line, environment and state directory: a record over HTTP and one
//! over MQTT reach the archive, and kill -9 loses nothing. The same root
//! then stands in for the container: the image's runtime user, `ENV` and the
//! compose overrides.
//!
//! `ldd` of the binary checks that the package's and the image's library
//! dependencies are exactly what it links (no root needed).
//!
//! Needs root (chroot, mounts). Skipped with a note otherwise.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{archived_keys, free_port, is_root, wait_until};

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A writable copy of the cached Debian root: an overlay over the cache,
/// with /proc and /dev mounted; everything unmounted on drop.
struct DebianRoot {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl DebianRoot {
    fn new() -> DebianRoot {
        let cache = PathBuf::from(
            run(Command::new(root_dir().join("scripts/debian-root.sh")).arg("--print-path"))
                .trim()
                .to_string(),
        );
        assert!(
            cache.join("usr/bin/dpkg").exists(),
            "no Debian root at {}",
            cache.display()
        );
        let dir = tempfile::tempdir_in(root_dir().join("target")).unwrap();
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("root"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut r = DebianRoot {
            dir,
            mounts: Vec::new(),
        };
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                cache.display(),
                upper.display(),
                work.display()
            ))
            .arg(&merged));
        r.mounts.push(merged.clone());
        run(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(merged.join("proc")));
        r.mounts.push(merged.join("proc"));
        run(Command::new("mount")
            .arg("--bind")
            .arg("/dev")
            .arg(merged.join("dev")));
        r.mounts.push(merged.join("dev"));
        r
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn chroot(&self) -> Command {
        self.chroot_as(None)
    }

    /// `chroot [--userspec=USER:USER] ROOT`, with a clean environment.
    fn chroot_as(&self, user: Option<&str>) -> Command {
        let mut c = Command::new("chroot");
        if let Some(u) = user {
            c.arg(format!("--userspec={u}:{u}"));
        }
        c.arg(self.path())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// `Key=value` lines of the unit's `[Service]` section.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// `args` in the root as `user`, with exactly `env` (and a PATH).
fn in_root(root: &DebianRoot, user: &str, env: &[(String, String)], args: &[String]) -> Command {
    let mut c = root.chroot_as(Some(user));
    // chroot --userspec keeps root's HOME; a service has the unit's environment only.
    c.arg("env").arg("-i").arg("PATH=/usr/bin:/bin");
    for (k, v) in env {
        c.arg(format!("{k}={v}"));
    }
    c.args(args);
    c
}

/// The installed binary in the root, as `user`, with `env` and `args`.
fn spawn_in_root(
    root: &DebianRoot,
    user: &str,
    env: &[(String, String)],
    args: &[String],
) -> Child {
    let mut c = in_root(root, user, env, args);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

fn http_post(port: u16, device: &str, msg: &str) -> u16 {
    ureq::post(&format!("http://127.0.0.1:{port}/ingest/{device}"))
        .set("Content-Type", "application/json")
        .send_string(&format!(
            r#"{{"msg_id":"{msg}","ts":1764057600000,"metrics":{{"t":1}}}}"#
        ))
        .map(|r| r.status())
        .unwrap_or_else(|e| match e {
            ureq::Error::Status(s, _) => s,
            _ => 0,
        })
}

fn wait_ready(port: u16, child: &mut Child) {
    wait_until(
        "the gateway in the root is ready",
        Duration::from_secs(30),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("the gateway exited with {status}: {err}");
            }
            ureq::get(&format!("http://127.0.0.1:{port}/readyz"))
                .call()
                .is_ok()
        },
    );
}

#[test]
fn the_deb_installs_into_debian_and_the_service_runs_as_its_user_and_loses_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root (chroot and mounts)");
        return;
    }
    // The package, from this build's binary.
    let out = tempfile::tempdir_in(root_dir().join("target")).unwrap();
    run(Command::new("cargo")
        .current_dir(root_dir())
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--strip",
            "--fast",
            "-q",
            "-o",
        ])
        .arg(out.path()));
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo deb wrote a .deb");

    let root = DebianRoot::new();
    std::fs::copy(&deb, root.path().join("tmp/gateway.deb")).unwrap();
    run(root.chroot().args(["dpkg", "-i", "/tmp/gateway.deb"]));

    // The user, the files, their owners and modes.
    let passwd = run(root.chroot().args(["getent", "passwd", "gateway"]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields[5], "/var/lib/gateway", "{passwd}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{passwd}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {passwd}");
    let stat = |p: &str| {
        run(root.chroot().args(["stat", "-c", "%U:%G %a", p]))
            .trim()
            .to_string()
    };
    assert_eq!(stat("/usr/bin/gateway"), "root:root 755");
    assert_eq!(stat("/lib/systemd/system/gateway.service"), "root:root 644");
    assert_eq!(stat("/etc/gateway"), "root:gateway 750");
    assert_eq!(stat("/etc/gateway/gateway.toml"), "root:gateway 640");
    assert_eq!(stat("/etc/gateway/secrets"), "root:gateway 750");
    let status = run(root.chroot().args(["dpkg", "-s", "gateway"]));
    assert!(
        status.contains("Conffiles:\n /etc/gateway/gateway.toml"),
        "{status}"
    );
    let check =
        run(root
            .chroot()
            .args(["gateway", "config", "check", "/etc/gateway/gateway.toml"]));
    assert!(check.contains("ok"), "{check}");

    // The unit, verified against the installed root.
    let unit_path = root.path().join("lib/systemd/system/gateway.service");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg(&unit_path)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for (k, v) in [
        ("User", "gateway"),
        ("StateDirectory", "gateway"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
        ("Type", "notify"),
    ] {
        assert_eq!(unit_values(&unit, k), [v], "{k}");
    }

    // Run it as systemd would: the unit's user, environment and command
    // line, the state directory made as StateDirectory makes it.
    run(root.chroot().args([
        "install",
        "-d",
        "-o",
        "gateway",
        "-g",
        "gateway",
        "-m",
        "0750",
        "/var/lib/gateway",
    ]));
    let (http, mqtt) = (free_port(), free_port());
    let mut env: Vec<(String, String)> = unit_values(&unit, "Environment")
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    // The test's ports instead of 8080 and 1883 (the host may use those).
    env.push(("GATEWAY_HTTP_ADDR".into(), format!("127.0.0.1:{http}")));
    env.push((
        "GATEWAY_MQTT_EMBEDDED_ADDR".into(),
        format!("127.0.0.1:{mqtt}"),
    ));
    let exec: Vec<String> = unit_values(&unit, "ExecStart")[0]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut gw = spawn_in_root(&root, "gateway", &env, &exec);
    wait_ready(http, &mut gw);
    assert_eq!(http_post(http, "dev-1", "h1"), 202);
    let (ok, err) = crate::broker::mosquitto_pub(
        mqtt,
        "devices/dev-2/telemetry",
        &[
            "-V",
            "mqttv311",
            "-m",
            r#"{"msg_id":"m1","ts":1764057600000,"metrics":{"t":2}}"#,
        ],
    );
    assert!(ok, "{err}");
    let archive = root.path().join("var/lib/gateway/archive");
    let want = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<HashSet<_>>();
    wait_until("both records archived", Duration::from_secs(20), || {
        archived_keys(&archive) == want(&["dev-1:h1", "dev-2:m1"])
    });
    // Everything it wrote belongs to the service user.
    let owners = run(root
        .chroot()
        .args(["find", "/var/lib/gateway", "-not", "-user", "gateway"]));
    assert_eq!(owners.trim(), "", "files not owned by the service user");

    // kill -9 with acknowledged records in flight; restart; nothing lost.
    let acked: Vec<String> = (0..200)
        .filter(|i| http_post(http, "dev-3", &format!("k{i}")) == 202)
        .map(|i| format!("dev-3:k{i}"))
        .collect();
    assert_eq!(acked.len(), 200);
    let _ = gw.kill();
    let _ = gw.wait();
    let _ = Command::new("pkill")
        .args(["-9", "-f", "/usr/bin/gateway --config"])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    let mut gw = spawn_in_root(&root, "gateway", &env, &exec);
    wait_ready(http, &mut gw);
    wait_until(
        "every acknowledged record archived after the restart",
        Duration::from_secs(30),
        || {
            let got = archived_keys(&archive);
            acked.iter().all(|k| got.contains(k))
        },
    );
    let _ = gw.kill();
    let _ = gw.wait();
    let _ = Command::new("pkill")
        .args(["-9", "-f", "/usr/bin/gateway --config"])
        .status();

    container_stand_in(&root);
}

/// The image, without an engine: the Dockerfile's runtime user and `ENV`
/// plus compose's environment, on a `/data` owned by that user, with the
/// compose configuration and the dev certificates. It starts, `gateway
/// healthcheck` (the compose healthcheck) passes, and without the
/// credentials compose mounts it refuses to start with one clear line.
fn container_stand_in(root: &DebianRoot) {
    let r = root.path();
    let dockerfile = std::fs::read_to_string(root_dir().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("--uid 10001"),
        "the image's user is uid 10001"
    );
    run(root
        .chroot()
        .args(["groupadd", "--system", "--gid", "10001", "app"]));
    run(root.chroot().args([
        "useradd",
        "--system",
        "--uid",
        "10001",
        "--gid",
        "10001",
        "--home-dir",
        "/data",
        "--shell",
        "/usr/sbin/nologin",
        "app",
    ]));
    run(root
        .chroot()
        .args(["install", "-d", "-o", "10001", "-g", "10001", "/data"]));
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    std::fs::copy(r.join("usr/bin/gateway"), r.join("usr/local/bin/gateway")).unwrap();
    let certs = r.join("etc/gateway/tls");
    run(Command::new(root_dir().join("certs/gen-dev-certs.sh"))
        .arg(&certs)
        .args(["gateway", "gateway-admin", "prometheus", "dev-1"]));
    run(Command::new(root_dir().join("certs/dev-device-token.sh"))
        .arg(&certs)
        .arg("dev-1"));
    // In the image /etc/gateway is made by compose's read-only mounts,
    // readable by uid 10001 (here the package made it root:gateway 0750).
    run(Command::new("chmod").arg("-R").arg("a+rX").arg(&certs));
    run(Command::new("chmod").arg("0755").arg(r.join("etc/gateway")));
    std::fs::copy(
        root_dir().join("compose/gateway/gateway.toml"),
        r.join("etc/gateway/compose.toml"),
    )
    .unwrap();
    let http = free_port();
    let mut env = dockerfile_env(&dockerfile);
    // compose.yml's environment, the port moved to a free one here.
    env.push(("GATEWAY_CONFIG".into(), "/etc/gateway/compose.toml".into()));
    env.push(("GATEWAY_HTTP_ADDR".into(), format!("127.0.0.1:{http}")));
    let args = ["/usr/local/bin/gateway".to_string(), "run".to_string()];
    let mut gw = spawn_in_root(root, "app", &env, &args);
    let healthcheck: Vec<String> = [
        "/usr/local/bin/gateway",
        "healthcheck",
        "--cert-file",
        "/etc/gateway/tls/gateway-admin.crt",
        "--key-file",
        "/etc/gateway/tls/gateway-admin.key",
    ]
    .map(String::from)
    .to_vec();
    let mut check = in_root(root, "app", &env, &healthcheck);
    wait_until(
        "the image's healthcheck passes",
        Duration::from_secs(30),
        || {
            if let Ok(Some(s)) = gw.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                gw.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("the gateway (container stand-in) exited with {s}: {err}");
            }
            check.output().map(|o| o.status.success()).unwrap_or(false)
        },
    );
    let line = String::from_utf8(check.output().unwrap().stdout).unwrap();
    assert!(
        line.starts_with("healthy: GET https://localhost:"),
        "{line}"
    );
    let _ = gw.kill();
    let _ = gw.wait();
    let _ = Command::new("pkill")
        .args(["-9", "-f", "/usr/local/bin/gateway run"])
        .status();
    std::thread::sleep(Duration::from_millis(300));

    // Without the credentials compose mounts: one line, non-zero exit.
    std::fs::remove_file(certs.join("server.key")).unwrap();
    let out = in_root(root, "app", &env, &args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("server.key"), "{err}");
}

/// The Dockerfile's runtime stage (the last).
fn runtime_stage(dockerfile: &str) -> &str {
    dockerfile.rsplit_once("\nFROM ").unwrap().1
}

/// `KEY=VALUE` pairs of the Dockerfile's runtime `ENV`.
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let last = runtime_stage(dockerfile);
    let mut out = Vec::new();
    let mut in_env = false;
    for line in last.lines() {
        let t = line.trim();
        if t.starts_with("ENV ") {
            in_env = true;
        }
        if in_env {
            for pair in t
                .trim_start_matches("ENV ")
                .trim_end_matches('\\')
                .split_whitespace()
            {
                if let Some((k, v)) = pair.split_once('=') {
                    out.push((k.to_string(), v.to_string()));
                }
            }
            in_env = t.ends_with('\\');
        }
    }
    assert!(out.iter().any(|(k, _)| k == "GATEWAY_DATA_DIR"), "{out:?}");
    out
}

/// The Debian package that holds a shared library (the path as `ldd`
/// resolved it, or the same file under /usr: Debian's merged /usr).
fn package_of(lib: &str) -> String {
    let alt = match lib.strip_prefix("/usr") {
        Some(rest) => rest.to_string(),
        None => format!("/usr{lib}"),
    };
    for path in [lib, alt.as_str()] {
        let out = Command::new("dpkg").args(["-S", path]).output().unwrap();
        if out.status.success() {
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            let pkg = line.split(':').next().unwrap().trim();
            return pkg.to_string();
        }
    }
    panic!("no Debian package holds {lib}");
}

/// The shared libraries a binary links (`ldd`): (soname, resolved path).
fn linked_libraries(bin: &str) -> Vec<(String, String)> {
    let out = run(Command::new("ldd").arg(bin));
    out.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(" => ")?;
            let path = rest.split(" (").next()?.trim();
            Some((name.to_string(), path.to_string()))
        })
        .collect()
}

/// Package names of a Debian relationship field ("a (>= 1), b | c").
fn package_names(field: &str) -> BTreeSet<String> {
    field
        .split([',', '|'])
        .map(|p| p.split_whitespace().next().unwrap_or("").to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

#[test]
fn the_binary_links_only_what_the_deb_and_the_image_install() {
    let bin = env!("CARGO_BIN_EXE_gateway");
    let libs = linked_libraries(bin);
    let sonames: Vec<&str> = libs.iter().map(|(n, _)| n.as_str()).collect();
    // The build turns these off (librdkafka: no curl, SASL or zstd); the
    // package and the image must not need them either.
    for unused in ["libcurl", "libsasl2", "libzstd", "liblz4", "libgssapi"] {
        assert!(
            !sonames.iter().any(|n| n.starts_with(unused)),
            "the binary links {unused}: {sonames:?}"
        );
    }
    // libc6's own dependencies (libgcc-s1) come with it.
    let linked: BTreeSet<String> = libs
        .iter()
        .map(|(_, path)| package_of(path))
        .filter(|p| p != "libgcc-s1")
        .collect();

    let manifest = std::fs::read_to_string(root_dir().join("Cargo.toml")).unwrap();
    let depends = manifest
        .lines()
        .find_map(|l| l.strip_prefix("depends = \""))
        .expect("[package.metadata.deb] depends")
        .trim_end_matches('"');
    let depends = package_names(depends);
    let deb_libs: BTreeSet<String> = depends
        .iter()
        .filter(|p| p.starts_with("lib") || p.as_str() == "zlib1g")
        .cloned()
        .collect();
    assert_eq!(
        deb_libs, linked,
        "the .deb's library dependencies ({depends:?}) must be exactly the packages of the libraries the binary links ({libs:?})"
    );

    // The image's runtime stage: debian:bookworm-slim has libc6 and zlib1g;
    // it installs the rest, and no library the binary does not link.
    let dockerfile = std::fs::read_to_string(root_dir().join("Dockerfile")).unwrap();
    let install = runtime_stage(&dockerfile)
        .split("apt-get install")
        .nth(1)
        .expect("the runtime stage installs packages");
    let installed: BTreeSet<String> = install
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .map(str::to_string)
        .collect();
    let image_libs: BTreeSet<String> = installed
        .iter()
        .filter(|p| p.starts_with("lib"))
        .cloned()
        .collect();
    let needed: BTreeSet<String> = linked
        .iter()
        .filter(|p| !["libc6", "zlib1g"].contains(&p.as_str()))
        .cloned()
        .collect();
    assert_eq!(
        image_libs, needed,
        "the image's runtime libraries ({installed:?}) against what the binary links"
    );
}
