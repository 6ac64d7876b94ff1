//! Logs: JSON lines on stdout, one event per line, level changeable at run time.

use std::sync::OnceLock;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Installs the global JSON logger with `level` (an EnvFilter directive).
/// A second call is a no-op (tests build several applications).
pub fn init_logging(level: &str) {
    init(level, false)
}

/// Like [`init_logging`], writing through the test harness so that output is
/// shown only for failing tests.
pub fn init_test_logging(level: &str) {
    init(level, true)
}

/// `level` plus our defaults for chatty dependencies, unless the operator
/// named them: the embedded broker logs every client disconnect as an error
/// from its router ("no-connection id N is already gone").
fn directive(level: &str) -> String {
    if level.contains("rumqttd") {
        level.to_string()
    } else {
        format!("{level},rumqttd::router::routing=off")
    }
}

fn init(level: &str, test: bool) {
    let filter = EnvFilter::try_new(directive(level)).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(true)
        .with_writer(std::io::stdout);
    // Spans are for traces, not log lines: keeping them away from the JSON
    // layer saves it from formatting every request span's fields (measured:
    // ~16% of the gateway's CPU under HTTP load).
    let events_only = filter_fn(|meta| meta.is_event());
    let fmt = if test {
        fmt.with_test_writer().with_filter(events_only).boxed()
    } else {
        fmt.with_filter(events_only).boxed()
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Changes the log level at run time.
pub fn set_log_level(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(directive(level)).map_err(|e| e.to_string())?;
    match FILTER.get() {
        Some(h) => h.reload(filter).map_err(|e| e.to_string()),
        None => Err("logging is not initialised".into()),
    }
}

/// The log level switch handed to the operator (`config.set log.level`).
pub struct Logs;

impl gateway_actors::control::LogControl for Logs {
    fn check(&self, level: &str) -> Result<(), String> {
        // EnvFilter takes a bare word as a target name ("debgu" would silence
        // every log line): each directive must end in a level.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        for part in level.split(',').map(str::trim) {
            let lvl = part.rsplit_once('=').map_or(part, |(_, l)| l);
            if !LEVELS.contains(&lvl.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "{part:?} does not end in a level (trace, debug, info, warn, error, off)"
                ));
            }
        }
        EnvFilter::try_new(directive(level))
            .map(|_| ())
            .map_err(|e| format!("{level:?} is not a level or filter directive: {e}"))
    }

    fn set(&self, level: &str) -> Result<(), String> {
        set_log_level(level)
    }
}
