//! Logs and traces.
//!
//! Logs: JSON lines on stdout, one event per line, level changeable at run
//! time ([`set_log_level`]).
//!
//! Traces: when `otlp.endpoint` is set (or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), an
//! OpenTelemetry layer turns the pipeline spans (`gateway_actors::trace`) and
//! the actix-web request spans into OTLP/HTTP protobuf exports, batched on
//! the SDK's own thread. Without it no OpenTelemetry layer exists and the
//! pipeline makes no spans at all.
//!
//! One subscriber: a reloadable `EnvFilter` at the registry (the run-time
//! log level), the JSON layer that sees only events, and the optional
//! OpenTelemetry layer that sees spans. With traces on, the filter always
//! lets the trace spans through, whatever the log level.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Traces are exported: the filter must keep their spans.
static TRACES_ON: AtomicBool = AtomicBool::new(false);

/// The OpenTelemetry `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "iot-gateway";

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] (or dropping it)
/// flushes the spans still queued.
#[must_use = "dropping it stops the trace exporter"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn traces_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued and stops the exporter.
    pub fn shutdown(mut self) {
        self.flush_and_stop();
    }

    fn flush_and_stop(&mut self) {
        if let Some(p) = self.provider.take() {
            gateway_actors::trace::set_enabled(false);
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces at shutdown: {e}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.flush_and_stop();
    }
}

/// Installs the global JSON logger with `level` (an EnvFilter directive),
/// without traces. A second call is a no-op (tests build several applications).
pub fn init_logging(level: &str) {
    let _ = init(level, false, None);
}

/// Like [`init_logging`], writing through the test harness so that output is
/// shown only for failing tests.
pub fn init_test_logging(level: &str) {
    let _ = init(level, true, None);
}

/// Installs the logger and, when an OTLP endpoint is configured
/// (`otlp_endpoint`, else the standard `OTEL_EXPORTER_OTLP_*` variables),
/// the trace exporter. `gateway_id` goes into the resource attributes.
/// An exporter that cannot be built is logged and traces stay off: telemetry
/// never stops the gateway.
pub fn init_with_traces(level: &str, otlp_endpoint: Option<&str>, gateway_id: &str) -> Telemetry {
    if !traces_wanted(otlp_endpoint) {
        return init(level, false, None);
    }
    match build_provider(otlp_endpoint, gateway_id) {
        Ok(provider) => {
            let t = init(level, false, Some(provider));
            if t.traces_enabled() {
                let endpoint = otlp_endpoint
                    .map(traces_url)
                    .unwrap_or_else(|| "from OTEL_EXPORTER_OTLP_* variables".into());
                tracing::info!(endpoint = %endpoint, "exporting traces over OTLP/HTTP");
            }
            t
        }
        Err(e) => {
            let t = init(level, false, None);
            tracing::error!(error = %e, "cannot build the OTLP trace exporter; traces are off");
            t
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn traces_wanted(otlp_endpoint: Option<&str>) -> bool {
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled
        && (otlp_endpoint.is_some()
            || env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The traces URL for a base URL (what `OTEL_EXPORTER_OTLP_ENDPOINT` means).
pub fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

fn build_provider(
    otlp_endpoint: Option<&str>,
    gateway_id: &str,
) -> anyhow::Result<SdkTracerProvider> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(base) = otlp_endpoint {
        // A configured key wins over the environment; without it the
        // exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself.
        exporter = exporter.with_endpoint(traces_url(base));
    }
    let exporter = ReportingExporter::new(
        exporter.build()?,
        otlp_endpoint.map_or_else(|| "OTEL_EXPORTER_OTLP_* endpoint".into(), traces_url),
    );
    let mut resource = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", gateway_id.to_string()),
        KeyValue::new("gateway.id", gateway_id.to_string()),
    ]);
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// How often a receiver that stays down is reported again.
const EXPORT_REPORT_EVERY: Duration = Duration::from_secs(60);

/// The OTLP exporter, logging when exports start failing, once a minute while
/// they keep failing, and when they work again — not once per batch (at full
/// load that would be hundreds of lines a second).
#[derive(Debug)]
struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    state: Mutex<ExportState>,
}

#[derive(Debug, Default)]
struct ExportState {
    /// Since when exports fail; `None` while they work.
    failing_since: Option<Instant>,
    last_report: Option<Instant>,
    /// Failed batches and spans since the last report.
    batches: u64,
    spans: u64,
}

impl<E> ReportingExporter<E> {
    fn new(inner: E, endpoint: String) -> Self {
        Self {
            inner,
            endpoint,
            state: Mutex::default(),
        }
    }

    fn note(&self, result: &OTelSdkResult, spans: usize) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        match result {
            Ok(()) => {
                if let Some(since) = st.failing_since.take() {
                    tracing::info!(
                        endpoint = %self.endpoint,
                        failed_for_s = since.elapsed().as_secs(),
                        dropped_spans = st.spans,
                        "trace export works again"
                    );
                    st.batches = 0;
                    st.spans = 0;
                }
            }
            Err(e) => {
                st.batches += 1;
                st.spans += spans as u64;
                let report = match (st.failing_since, st.last_report) {
                    (None, _) => true,
                    (Some(_), Some(last)) => now.duration_since(last) >= EXPORT_REPORT_EVERY,
                    (Some(_), None) => true,
                };
                if st.failing_since.is_none() {
                    st.failing_since = Some(now);
                }
                if report {
                    tracing::error!(
                        endpoint = %self.endpoint,
                        error = %e,
                        failed_batches = st.batches,
                        dropped_spans = st.spans,
                        "cannot export traces; spans are dropped until the receiver answers"
                    );
                    st.last_report = Some(now);
                    st.batches = 0;
                    st.spans = 0;
                }
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let spans = batch.len();
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            self.note(&result, spans);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// `level` plus our defaults for chatty dependencies, unless the operator
/// named them: the embedded broker logs every client disconnect as an error
/// from its router ("no-connection id N is already gone"). With traces on,
/// the span targets stay enabled at any log level.
fn directive(level: &str) -> String {
    let mut d = if level.contains("rumqttd") {
        level.to_string()
    } else {
        format!("{level},rumqttd::router::routing=off")
    };
    // Operator actions are always logged (target `audit`), whatever the
    // level, unless the directive names the target itself.
    if !level.contains("audit") {
        d.push_str(",audit=info");
    }
    if TRACES_ON.load(Ordering::Relaxed) {
        d.push(',');
        d.push_str(gateway_actors::trace::TARGET);
        d.push_str("=info,tracing_actix_web=info");
    }
    d
}

fn init(level: &str, test: bool, provider: Option<SdkTracerProvider>) -> Telemetry {
    let traces_before = TRACES_ON.swap(provider.is_some(), Ordering::Relaxed);
    let filter =
        EnvFilter::try_new(directive(level)).unwrap_or_else(|_| EnvFilter::new(directive("info")));
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
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            // Fewer attributes and no clock reads on every enter/exit.
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if !installed {
        // A logger was already there (tests): this call changes nothing.
        TRACES_ON.store(traces_before, Ordering::Relaxed);
        if let Some(p) = provider {
            let _ = p.shutdown();
        }
        return Telemetry { provider: None };
    }
    let _ = FILTER.set(handle);
    if provider.is_some() {
        // W3C trace context in and out (tracing-actix-web reads it).
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        gateway_actors::trace::set_enabled(true);
    }
    Telemetry { provider }
}

/// Changes the log level at run time (trace spans are kept whatever the level).
pub fn set_log_level(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(directive(level)).map_err(|e| e.to_string())?;
    match FILTER.get() {
        Some(h) => h.reload(filter).map_err(|e| e.to_string()),
        None => Err("logging is not initialised".into()),
    }
}

/// Checks a `log.level` value: a level or EnvFilter directives, each of
/// which must end in a level. (EnvFilter alone takes a bare word as a target
/// name: "debgu" would silence every log line.)
pub fn check_level(level: &str) -> Result<(), String> {
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

/// The log level switch handed to the operator (`config.set log.level`).
pub struct Logs;

impl gateway_actors::control::LogControl for Logs {
    fn check(&self, level: &str) -> Result<(), String> {
        check_level(level)
    }

    fn set(&self, level: &str) -> Result<(), String> {
        set_log_level(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_receiver_is_reported_once_then_counted_until_it_answers() {
        let x = ReportingExporter::new((), "http://collector/v1/traces".into());
        let down = Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
            "connection refused".into(),
        ));
        x.note(&down, 512);
        {
            let st = x.state.lock().unwrap();
            assert!(st.failing_since.is_some() && st.last_report.is_some());
            assert_eq!((st.batches, st.spans), (0, 0), "reported and reset");
        }
        x.note(&down, 512);
        x.note(&down, 100);
        {
            let st = x.state.lock().unwrap();
            assert_eq!((st.batches, st.spans), (2, 612), "counted, not reported");
        }
        x.note(&Ok(()), 10);
        let st = x.state.lock().unwrap();
        assert!(st.failing_since.is_none());
        assert_eq!((st.batches, st.spans), (0, 0));
    }

    #[test]
    fn the_traces_url_appends_the_signal_path_to_the_base() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/collector/"),
            "https://otel.example/collector/v1/traces"
        );
    }
}
