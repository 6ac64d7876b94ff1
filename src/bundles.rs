//! Fleet config bundles in the binary (DESIGN §11; the life of a bundle is
//! described in `gateway_actors::fleet::bundle`): which bundle a start
//! layers in, the hooks the fleet client needs to apply one (validate the
//! merged configuration, restart), and the re-exec itself.
//!
//! Restart = re-exec only: the gateway stops as on SIGTERM (the HTTP server
//! drains, the WAL writer stores the acknowledgements it holds), then
//! `main` executes `/proc/self/exe` with the same arguments and
//! environment. The process id stays the same (a supervisor sees no exit);
//! the data dir lock is released by the exec (close-on-exec) and taken
//! again by the new image.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use gateway_actors::fleet::apply::{Restart, Validate};
use gateway_actors::fleet::bundle::{Boot, BundleStore};

use crate::config::{ConfigError, FlagLayer, Loaded, Settings};

/// What `gateway run` started from: the inputs a bundle is layered with,
/// and the boot decision.
pub struct Context {
    /// `--config` / `GATEWAY_CONFIG`.
    pub config: Option<PathBuf>,
    /// The flags.
    pub flags: FlagLayer,
    /// The bundles of the data dir.
    pub store: BundleStore,
    /// What this start runs with.
    pub boot: Boot,
}

static CONTEXT: OnceLock<Context> = OnceLock::new();
static REEXEC: AtomicBool = AtomicBool::new(false);

/// The context of `gateway run` (none in tests that build an `Application`
/// in process: bundles are refused there).
pub fn context() -> Option<&'static Context> {
    CONTEXT.get()
}

/// Loads the settings of `gateway run`: the layers, and when the fleet is
/// on, the bundle the data dir's bundle store says to run with (rolled
/// back first when it does not validate any more). Call it holding the
/// data dir lock: the boot decision is written to disk.
///
/// Returns the settings and, for the log once logging is up, what happened.
pub fn load_settings(
    config: Option<&Path>,
    flags: &FlagLayer,
    base: Settings,
) -> Result<(Settings, Vec<String>), ConfigError> {
    let mut notes = Vec::new();
    if base.fleet.is_none() {
        return Ok((base, notes));
    }
    let store = match BundleStore::open(&base.data_dir) {
        Ok(s) => s,
        Err(e) => {
            notes.push(format!("config bundles off: {e}"));
            return Ok((base, notes));
        }
    };
    let mut boot = match store.boot() {
        Ok(b) => b,
        Err(e) => {
            notes.push(format!(
                "config bundles off: cannot read {}: {e}",
                store.dir().display()
            ));
            return Ok((base, notes));
        }
    };
    if let Some(r) = &boot.state.reason {
        notes.push(format!(
            "config bundle {:?} is {}: {r}",
            boot.state.version,
            boot.state.status.as_str()
        ));
    }
    let settings = loop {
        let Some(b) = &boot.layer else {
            break base;
        };
        match Loaded::load_with_bundle(config, true, flags, Some((b.version, &b.settings)))
            .and_then(|l| l.settings())
        {
            Ok(s) => break s,
            Err(e) if boot.probation => {
                let reason = format!("invalid at start: {e}");
                notes.push(format!("config bundle {} rolled back: {reason}", b.version));
                boot.state = store.roll_back(&reason).map_err(|e| ConfigError::Layer {
                    layer: format!("bundle {}", b.version),
                    message: e,
                })?;
                boot.probation = false;
                boot.layer = match boot.state.active {
                    Some(v) => Some(store.bundle(v).map_err(|e| ConfigError::Layer {
                        layer: format!("bundle {v}"),
                        message: e,
                    })?),
                    None => None,
                };
            }
            Err(e) => {
                // The active bundle no longer fits the file or the
                // environment: run without it rather than not at all.
                notes.push(format!(
                    "the active config bundle {} does not validate any more ({e}); running without it",
                    b.version
                ));
                boot.layer = None;
            }
        }
    };
    let _ = CONTEXT.set(Context {
        config: config.map(Path::to_path_buf),
        flags: flags.clone(),
        store,
        boot,
    });
    Ok((settings, notes))
}

/// The hook that validates a bundle's settings layered over this start's
/// file, environment and flags.
pub fn validator(ctx: &'static Context) -> Validate {
    Arc::new(move |version, settings| {
        Loaded::load_with_bundle(
            ctx.config.as_deref(),
            true,
            &ctx.flags,
            Some((version, settings)),
        )
        .and_then(|l| l.settings())
        .map(|_| ())
        .map_err(|e| e.to_string())
    })
}

/// The hook that stops the server (`set_server` gives it) for a re-exec.
pub fn restarter() -> (Restart, Arc<Mutex<Option<actix_web::dev::ServerHandle>>>) {
    let server: Arc<Mutex<Option<actix_web::dev::ServerHandle>>> = Arc::default();
    let s = server.clone();
    let restart: Restart = Arc::new(move |why: &str| {
        tracing::warn!(
            reason = why,
            "stopping to re-execute with the new configuration"
        );
        REEXEC.store(true, Ordering::SeqCst);
        let handle = s.lock().ok().and_then(|g| g.clone());
        match handle {
            Some(h) => {
                actix_rt::spawn(async move { h.stop(true).await });
            }
            None => tracing::error!("no server to stop; the re-exec waits for the next stop"),
        }
    });
    (restart, server)
}

/// True when the gateway stopped to re-execute itself.
pub fn reexec_requested() -> bool {
    REEXEC.load(Ordering::SeqCst)
}

/// Replaces the process with a new run of the same binary, arguments and
/// environment. Returns only when the exec failed.
pub fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args).exec()
}
