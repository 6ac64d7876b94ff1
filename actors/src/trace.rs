//! Pipeline spans (DESIGN §8): `ingest`, `wal.append`, `dispatch`,
//! `sink.publish`, `sink.retry`, and the W3C `traceparent` they travel with.
//!
//! The spans are ordinary `tracing` spans with target [`TARGET`]; the binary
//! turns them into OpenTelemetry spans (`tracing-opentelemetry`) and exports
//! them over OTLP. Nothing here depends on the exporter.
//!
//! Cost when traces are off: every helper checks [`enabled`] (one relaxed
//! atomic load) first and returns `Span::none()`, so the hot path neither
//! builds spans nor parses traceparents. The binary calls [`set_enabled`]
//! once, when it installs the OpenTelemetry layer.
//!
//! How the spans relate:
//! - `ingest` (device_id, source, correlation_id) is the root of the gateway's
//!   part of a trace. Over MQTT its parent is the `traceparent` user property,
//!   if any; over HTTP it is the child of the actix-web request span, which
//!   continues the `traceparent` header.
//! - `wal.append` (records) is its child: the append up to the commit.
//! - The record stores the `ingest` span's own context as its `traceparent`
//!   (the producer's when traces are off), so what comes later can point at it.
//! - `dispatch` (sink, batch_size, outcome) is one batch's delivery, a new
//!   trace with a span link to the `ingest` span of every record it carries
//!   (a batch mixes many traces: links, not parents).
//! - `sink.publish` (sink, batch_size, attempt, outcome) is one attempt, child
//!   of `dispatch`; `sink.retry` (attempt, delay_ms, error) the backoff wait
//!   before the next attempt, also child of `dispatch`.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

// Integer fields are recorded as i64: the OpenTelemetry layer turns u64
// fields into strings.

use crate::wal::Batch;

/// The `tracing` target of every pipeline span (lets the log filter keep
/// them when the log level is above `info`).
pub const TARGET: &str = "gateway_trace";

/// Links per `dispatch` span at most (the OpenTelemetry SDK's default limit).
pub const MAX_LINKS: usize = 128;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span creation on (the binary does this when it exports traces).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether pipeline spans are being made.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Parses a W3C `traceparent` (version 00) into a remote span context.
/// All-zero ids are invalid per the spec and give `None`.
pub fn parse_traceparent(tp: &str) -> Option<SpanContext> {
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16)
        .ok()
        .filter(|_| flags.len() == 2)?;
    let cx = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Formats a span context as a W3C `traceparent`.
pub fn format_traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// The `traceparent` of `span`'s OpenTelemetry context, when it has one.
pub fn traceparent_of(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format_traceparent(&sc))
}

/// The `traceparent` field of a canonical record's JSON (cheap check first).
pub fn record_traceparent(json: &str) -> Option<&str> {
    const KEY: &str = "\"traceparent\":\"";
    let at = json.find(KEY)? + KEY.len();
    let rest = &json[at..];
    // A valid traceparent has no characters JSON escapes.
    rest.find('"').map(|end| &rest[..end])
}

/// The `ingest` span of one request or message. With `remote` (MQTT's
/// user property) the span continues that trace; without it the span is the
/// child of the current span (HTTP: the request span), or a root.
pub fn ingest_span(
    source: &str,
    device_id: &str,
    correlation_id: &str,
    remote: Option<&str>,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    match remote.and_then(parse_traceparent) {
        Some(parent) => {
            let span = tracing::info_span!(
                target: TARGET,
                parent: None,
                "ingest",
                otel.kind = "consumer",
                device_id,
                source,
                correlation_id,
            );
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
            span
        }
        None => tracing::info_span!(
            target: TARGET,
            "ingest",
            otel.kind = if source == "mqtt" { "consumer" } else { "internal" },
            device_id,
            source,
            correlation_id,
        ),
    }
}

/// The `wal.append` span of `records` records, child of `ingest`.
pub fn wal_append_span(ingest: &Span, records: usize) -> Span {
    if ingest.is_disabled() {
        return Span::none();
    }
    tracing::info_span!(target: TARGET, parent: ingest, "wal.append", records = records as i64)
}

/// The `dispatch` span of one batch: a new trace linked to the `ingest` span
/// of each record (deduplicated, at most [`MAX_LINKS`]).
pub fn dispatch_span(sink: &str, batch: &Batch) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "dispatch",
        sink,
        batch_size = batch.records.len() as i64,
        first_seq = batch.first_seq() as i64,
        last_seq = batch.last_seq() as i64,
        outcome = tracing::field::Empty,
    );
    let mut seen: Vec<SpanContext> = Vec::new();
    for r in &batch.records {
        if seen.len() >= MAX_LINKS {
            break;
        }
        if let Some(cx) = record_traceparent(&r.json).and_then(parse_traceparent) {
            if !seen.iter().any(|s| s.span_id() == cx.span_id()) {
                seen.push(cx);
            }
        }
    }
    for cx in seen {
        span.add_link(cx);
    }
    span
}

/// The `sink.publish` span of one attempt, child of `dispatch`.
pub fn publish_span(dispatch: &Span, sink: &str, batch_size: usize, attempt: u32) -> Span {
    if dispatch.is_disabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        parent: dispatch,
        "sink.publish",
        otel.kind = "producer",
        sink,
        batch_size = batch_size as i64,
        attempt = i64::from(attempt),
        outcome = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// The `sink.retry` span: the backoff wait before attempt `attempt + 1`.
pub fn retry_span(
    dispatch: &Span,
    sink: &str,
    attempt: u32,
    delay_ms: u64,
    error: &dyn std::fmt::Display,
) -> Span {
    if dispatch.is_disabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        parent: dispatch,
        "sink.retry",
        sink,
        attempt = i64::from(attempt),
        delay_ms = delay_ms as i64,
        error = %error,
    )
}

/// The `traceparent` a sink passes on for the batch it is publishing: the
/// current `sink.publish` span's when traces are on, otherwise the records'
/// own when they all share one (a batch of one record, typically).
pub fn outgoing_traceparent(batch: &Batch) -> Option<String> {
    if enabled() {
        if let Some(tp) = traceparent_of(&Span::current()) {
            return Some(tp);
        }
    }
    let mut shared: Option<&str> = None;
    for r in &batch.records {
        let tp = record_traceparent(&r.json)?;
        match shared {
            None => shared = Some(tp),
            Some(s) if s == tp => {}
            Some(_) => return None,
        }
    }
    shared.map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_invalid_ones_are_refused() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = parse_traceparent(tp).unwrap();
        assert!(cx.is_remote() && cx.is_sampled());
        assert_eq!(format_traceparent(&cx), tp);
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_record_traceparent_is_read_from_the_canonical_json() {
        assert_eq!(record_traceparent(r#"{"a":1}"#), None);
        assert_eq!(
            record_traceparent(r#"{"a":1,"traceparent":"00-x-y-01"}"#),
            Some("00-x-y-01")
        );
    }

    fn batch_of(tps: &[Option<&str>]) -> Batch {
        let records = tps
            .iter()
            .enumerate()
            .map(|(i, tp)| crate::wal::StoredRecord {
                seq: i as u64 + 1,
                device_id: "d".into(),
                idempotency_key: format!("d:{i}"),
                correlation_id: "c".into(),
                receive_ms: 0,
                class: Default::default(),
                json: match tp {
                    Some(tp) => format!(r#"{{"device_id":"d","traceparent":"{tp}"}}"#),
                    None => r#"{"device_id":"d"}"#.into(),
                },
            })
            .collect();
        Batch {
            sink: "s".into(),
            ranges: vec![],
            records,
        }
    }

    #[test]
    fn without_traces_a_sink_passes_on_the_traceparent_only_when_the_whole_batch_shares_it() {
        set_enabled(false);
        let a = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let b = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            outgoing_traceparent(&batch_of(&[Some(a)])).as_deref(),
            Some(a)
        );
        assert_eq!(
            outgoing_traceparent(&batch_of(&[Some(a), Some(a)])).as_deref(),
            Some(a)
        );
        assert_eq!(outgoing_traceparent(&batch_of(&[Some(a), Some(b)])), None);
        assert_eq!(outgoing_traceparent(&batch_of(&[Some(a), None])), None);
        assert_eq!(outgoing_traceparent(&batch_of(&[None])), None);
    }

    #[test]
    fn spans_are_not_made_while_traces_are_off() {
        set_enabled(false);
        assert!(ingest_span("http", "d", "c", None).is_disabled());
        let batch = Batch {
            sink: "s".into(),
            ranges: vec![],
            records: vec![],
        };
        assert!(dispatch_span("s", &batch).is_disabled());
    }
}
