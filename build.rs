//! Records the git commit and build time for `/version` and `--version`.

use std::process::Command;

fn main() {
    // A container build has no .git: the commit comes in as an environment
    // variable (the Dockerfile's GIT_COMMIT build argument).
    let commit = std::env::var("GATEWAY_GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .map(|c| if tree_is_dirty() { c + "-dirty" } else { c })
        })
        .unwrap_or_else(|| "unknown".into());
    let build_time = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=GATEWAY_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=GATEWAY_BUILD_TIME={build_time}");
    println!("cargo:rerun-if-env-changed=GATEWAY_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-changed=build.rs");
    // An edit makes the tree dirty (and a commit, above, clean again).
    for dir in ["src", "actors/src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={dir}");
    }
}

/// Tracked files differ from HEAD: the binary is not that commit.
fn tree_is_dirty() -> bool {
    Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty())
}
