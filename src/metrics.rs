//! Prometheus metrics, one registry per server instance (not a process-wide recorder),
//! so that several servers in one test process keep their own counts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why something was refused or dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Outcome of a request to the tenant backend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Bytes of frames sent to gzip streams, before compression and on the wire.
#[derive(Clone, Default)]
pub struct GzipMeter {
    pub frames: Counter,
    pub wire: Counter,
    /// The compressors all gzip streams share (`GZIP_MEMORY_BYTES`).
    pub compressors: crate::gzip::Budget,
}

impl GzipMeter {
    /// `viewers` were each sent a `frame` as `wire` bytes.
    pub fn count(&self, frame: usize, wire: usize, viewers: usize) {
        self.frames.inc_by((frame * viewers) as u64);
        self.wire.inc_by((wire * viewers) as u64);
    }
}

/// Every metric the server exposes; counters are cheap atomics, safe on the hot path.
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connects: Counter,
    pub sessions: Gauge,
    pub messages_received: Counter,
    pub messages_dropped: Family<Reason, Counter>,
    pub messages_delivered: Counter,
    pub bytes_delivered: Counter,
    pub gzip: GzipMeter,
    pub batches: Counter,
    pub events_delivered: Counter,
    pub batch_size: Histogram,
    pub tick_seconds: Histogram,
    pub runtime_lag: Histogram,
    /// The latest lag seen, in milliseconds (for `/readyz`).
    pub runtime_lag_ms: Gauge,
    pub viewers_in_step: Gauge,
    pub replay_bytes: Gauge,
    pub slow_subscribers: Counter,
    pub catch_ups: Counter,
    pub messages_skipped: Counter,
    pub rejected_connections: Family<Reason, Counter>,
    pub broker_disconnects: Counter,
    pub usage_captured: Counter,
    pub billing_requests: Family<Outcome, Counter>,
    pub billing_pending: Gauge,
    pub pending_connections: Gauge,
    pub pending_evicted: Counter,
    pub accept_errors: Counter,
    pub billing_uncounted: Gauge,
    pub billing_flushes: Counter,
    pub billing_dropped: Counter,
    pub billing_store_resets: Counter,
    pub history_joins: Family<Outcome, Counter>,
    pub history_write_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chat_sync");
        let m = Self {
            connections: Gauge::default(),
            connects: Counter::default(),
            sessions: Gauge::default(),
            messages_received: Counter::default(),
            messages_dropped: Family::default(),
            messages_delivered: Counter::default(),
            bytes_delivered: Counter::default(),
            gzip: GzipMeter::default(),
            batches: Counter::default(),
            events_delivered: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            tick_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
            runtime_lag: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            runtime_lag_ms: Gauge::default(),
            viewers_in_step: Gauge::default(),
            replay_bytes: Gauge::default(),
            slow_subscribers: Counter::default(),
            catch_ups: Counter::default(),
            messages_skipped: Counter::default(),
            rejected_connections: Family::default(),
            broker_disconnects: Counter::default(),
            usage_captured: Counter::default(),
            billing_requests: Family::default(),
            billing_pending: Gauge::default(),
            pending_connections: Gauge::default(),
            pending_evicted: Counter::default(),
            accept_errors: Counter::default(),
            billing_uncounted: Gauge::default(),
            billing_flushes: Counter::default(),
            billing_dropped: Counter::default(),
            billing_store_resets: Counter::default(),
            history_joins: Family::default(),
            history_write_errors: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("connections", "Open SSE connections", m.connections.clone());
        r.register(
            "pending_connections",
            "Connections accepted whose first request head is not complete yet",
            m.pending_connections.clone(),
        );
        r.register(
            "pending_connections_evicted",
            "Connections without a complete request head closed to admit newer ones",
            m.pending_evicted.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accepts (out of file descriptors...)",
            m.accept_errors.clone(),
        );
        r.register(
            "sessions",
            "Sessions live on this instance",
            m.sessions.clone(),
        );
        r.register(
            "sse_connects",
            "SSE connect attempts, admitted or not",
            m.connects.clone(),
        );
        r.register(
            "messages_received",
            "Chat messages received from the broker",
            m.messages_received.clone(),
        );
        r.register(
            "messages_dropped",
            "Chat messages dropped before fan-out, by reason",
            m.messages_dropped.clone(),
        );
        r.register(
            "messages_delivered",
            "Chat messages handed to subscribers (messages x subscribers)",
            m.messages_delivered.clone(),
        );
        r.register(
            "bytes_delivered",
            "SSE bytes handed to subscribers",
            m.bytes_delivered.clone(),
        );
        r.register(
            "gzip_frame_bytes",
            "Bytes of the frames sent to gzip streams, before compression",
            m.gzip.frames.clone(),
        );
        r.register(
            "gzip_wire_bytes",
            "Bytes written to gzip streams: what the frames in gzip_frame_bytes became",
            m.gzip.wire.clone(),
        );
        r.register(
            "gzip_compressors",
            "Compressors running, each about 300 KiB: at most GZIP_MEMORY_BYTES / 300 KiB",
            m.gzip.compressors.running(),
        );
        r.register(
            "gzip_compressors_refused",
            "Frames sent to gzip streams uncompressed (stored) because every compressor \
             GZIP_MEMORY_BYTES allows was running",
            m.gzip.compressors.refused(),
        );
        r.register("batches", "Batches framed by the ticker", m.batches.clone());
        r.register(
            "events_delivered",
            "Batch events handed to subscribers (batches x subscribers)",
            m.events_delivered.clone(),
        );
        r.register("batch_size", "Messages per batch", m.batch_size.clone());
        r.register(
            "tick_duration_seconds",
            "Time one tick spends capturing and fanning out",
            m.tick_seconds.clone(),
        );
        r.register(
            "runtime_lag_seconds",
            "How much later than asked a task of this process wakes up (measured every \
             100 ms): how busy the runtime is, whatever keeps it busy",
            m.runtime_lag.clone(),
        );
        r.register(
            "viewers_in_step",
            "Viewers the fan-out writes to directly, because they keep up",
            m.viewers_in_step.clone(),
        );
        r.register(
            "replay_bytes",
            "Bytes the sessions' replay buffers hold (each bounded by REPLAY_BYTES); \
             every viewer, live or lagging, reads its frames from there",
            m.replay_bytes.clone(),
        );
        r.register(
            "slow_subscribers_dropped",
            "Subscribers disconnected because what they missed had left the replay buffer",
            m.slow_subscribers.clone(),
        );
        r.register(
            "catch_ups",
            "Batches that merged several missed frames for a viewer that fell behind",
            m.catch_ups.clone(),
        );
        r.register(
            "messages_skipped",
            "Messages left out of batches for viewers that asked for at most so many \
             per event (max_batch), counted once per viewer; each viewer is told",
            m.messages_skipped.clone(),
        );
        r.register(
            "connections_rejected",
            "SSE connects refused, by reason",
            m.rejected_connections.clone(),
        );
        r.register(
            "broker_disconnects",
            "Times the broker connection was lost",
            m.broker_disconnects.clone(),
        );
        r.register(
            "usage_captured",
            "Chat messages captured by the ticker (billable usage)",
            m.usage_captured.clone(),
        );
        r.register(
            "billing_requests",
            "Usage reports sent to the tenant backend, by outcome",
            m.billing_requests.clone(),
        );
        r.register(
            "billing_pending",
            "Captured messages not yet acknowledged by the tenant backend",
            m.billing_pending.clone(),
        );
        r.register(
            "billing_uncounted",
            "Captured messages not yet counted in the shared usage store",
            m.billing_uncounted.clone(),
        );
        r.register(
            "billing_flushes",
            "Usage report rounds completed, whether or not they had anything to send",
            m.billing_flushes.clone(),
        );
        r.register(
            "billing_dropped",
            "Captured messages dropped unbilled because the usage store was unreachable too long",
            m.billing_dropped.clone(),
        );
        r.register(
            "billing_store_resets",
            "Times the usage store in Redis was found to have lost its state (restart without persistence)",
            m.billing_store_resets.clone(),
        );
        r.register(
            "history_joins",
            "Sessions this instance started serving, by how they joined the shared history \
             (answered/overlap: exactly; empty: nothing before; unanswered/unreadable: with a reset)",
            m.history_joins.clone(),
        );
        r.register(
            "history_write_errors",
            "Rounds of writes to the shared history that failed (the history marks a gap)",
            m.history_write_errors.clone(),
        );
        // Every known label value starts at 0, so dashboards and rate() see the series
        // before the first event (an empty family is not exposed at all).
        for reason in [
            "oversize",
            "oversize_end",
            "inbox_full",
            "unknown_session",
            "after_end",
            "bad_join_request",
        ] {
            m.drop_message_counter(reason);
        }
        for reason in [
            "ended",
            "shutting_down",
            "max_connections",
            "max_connections_per_session",
            "max_sessions",
            "max_streams_per_client",
            "new_sessions_per_client",
            "broker",
        ] {
            drop(m.rejected_connections.get_or_create(&Reason { reason }));
        }
        for outcome in ["accepted", "failed", "dropped"] {
            drop(m.billing_requests.get_or_create(&Outcome { outcome }));
        }
        for outcome in ["answered", "overlap", "empty", "unanswered", "unreadable"] {
            drop(m.history_joins.get_or_create(&Outcome { outcome }));
        }
        Self { registry, ..m }
    }

    fn drop_message_counter(&self, reason: &'static str) {
        drop(self.messages_dropped.get_or_create(&Reason { reason }));
    }

    /// The registry in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing into a String cannot fail");
        out
    }

    pub fn drop_message(&self, reason: &'static str) {
        self.messages_dropped
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn history_join(&self, outcome: &'static str) {
        self.history_joins.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn reject_connection(&self, reason: &'static str) {
        self.rejected_connections
            .get_or_create(&Reason { reason })
            .inc();
    }
}
