//! What the viewers saw: per-connection delivery bitsets (exact loss, duplicates and
//! reorders), a latency histogram, and the report.

use hdrhistogram::Histogram;

use crate::Args;

/// One viewer's record of which messages of its session it received.
pub struct Seen {
    bits: Vec<u64>,
    max: Option<u64>,
    pub unique: u64,
}

impl Seen {
    pub fn new() -> Self {
        Self {
            bits: Vec::new(),
            max: None,
            unique: 0,
        }
    }
}

pub struct Stats {
    pub connected: usize,
    pub failed: usize,
    /// Streams that ended before the run did.
    pub closed: usize,
    pub events: u64,
    pub delivered: u64,
    /// Body bytes received (as on the wire: compressed for gzip streams).
    pub wire_bytes: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub latency_us: Histogram<u64>,
    /// Unique messages per session, summed over its viewers (for loss).
    pub unique: u64,
    /// When the measured window began, and when its last message arrived (µs).
    window_start_us: u64,
    last_delivery_us: u64,
    sessions: usize,
}

pub struct Context<'a> {
    pub args: &'a Args,
    pub connections: usize,
    pub connect_secs: f64,
    pub published: u64,
    pub elapsed: f64,
    pub server_cpu: f64,
    pub own_cpu: f64,
    pub rss_base: u64,
    pub rss_connected: u64,
    pub rss_end: u64,
}

impl Stats {
    pub fn new(sessions: usize) -> Self {
        Self {
            connected: 0,
            failed: 0,
            closed: 0,
            events: 0,
            delivered: 0,
            wire_bytes: 0,
            duplicates: 0,
            reorders: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).unwrap(),
            unique: 0,
            window_start_us: crate::client::now_us(),
            last_delivery_us: 0,
            sessions,
        }
    }

    /// Forgets whatever arrived before the measured window (warm-up, connects).
    pub fn reset_window(&mut self) {
        self.events = 0;
        self.delivered = 0;
        self.duplicates = 0;
        self.reorders = 0;
        self.unique = 0;
        self.latency_us.reset();
        self.window_start_us = crate::client::now_us();
        self.last_delivery_us = self.window_start_us;
    }

    /// Message `q` of the viewer's session arrived, published at `sent_us`.
    pub fn message(&mut self, seen: &mut Seen, q: u64, sent_us: u64, now_us: u64) {
        self.delivered += 1;
        self.last_delivery_us = now_us;
        let _ = self
            .latency_us
            .record(now_us.saturating_sub(sent_us).max(1));
        let (word, bit) = ((q / 64) as usize, q % 64);
        if seen.bits.len() <= word {
            seen.bits.resize(word + 1, 0);
        }
        if seen.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        seen.bits[word] |= 1 << bit;
        seen.unique += 1;
        self.unique += 1;
        if seen.max.is_some_and(|m| q < m) {
            self.reorders += 1;
        }
        seen.max = Some(seen.max.map_or(q, |m| m.max(q)));
    }

    /// How many messages session `s` gets out of `total`, published round robin.
    pub fn expected_for(total: u64, sessions: usize, s: usize) -> u64 {
        let sessions = sessions as u64;
        total / sessions + u64::from((s as u64) < total % sessions)
    }

    pub fn report(&self, c: Context<'_>) -> serde_json::Value {
        let args = c.args;
        let total = args.rate * args.duration;
        // Expected deliveries: each of this shard's connections expects its session's share.
        let (shard, shards) = args.shard.split_once('/').map_or((0, 1), |(a, b)| {
            (a.parse().unwrap_or(0), b.parse().unwrap_or(1))
        });
        let expected: u64 = (shard..args.connections)
            .step_by(shards)
            .map(|i| Self::expected_for(total, self.sessions, i % self.sessions))
            .sum();
        let lost = expected.saturating_sub(self.unique);
        let h = &self.latency_us;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        // What the connections added to the server, not its baseline.
        let rss_per_conn =
            c.rss_connected.saturating_sub(c.rss_base) as f64 / c.connections.max(1) as f64;
        // Deliveries per second from the first publish to the last delivery, so that a
        // saturated server that falls behind is not credited with the offered rate.
        let active_secs = (self.last_delivery_us.saturating_sub(self.window_start_us) as f64 / 1e6)
            .max(args.duration as f64)
            .max(0.001);
        serde_json::json!({
            "label": args.label,
            "target": format!("{:?}", args.target),
            "connections": c.connections,
            "sessions": args.sessions,
            "connected": self.connected,
            "failed": self.failed,
            "closed_early": self.closed,
            "connect_secs": round(c.connect_secs),
            "rate": args.rate,
            "published": c.published,
            "expected_deliveries": expected,
            "delivered": self.delivered,
            "delivered_per_sec": round(self.delivered as f64 / active_secs),
            "lost": lost,
            "duplicates": self.duplicates,
            "reorders": self.reorders,
            "events": self.events,
            "events_per_sec": round(self.events as f64 / active_secs),
            "avg_batch": round(self.delivered as f64 / self.events.max(1) as f64),
            "gzip": args.gzip,
            "wire_bytes": self.wire_bytes,
            "wire_bytes_per_delivery": round(self.wire_bytes as f64 / self.delivered.max(1) as f64),
            "latency_ms": {
                "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0,
            },
            "server_cpu_secs": round(c.server_cpu),
            "server_cpu_us_per_delivery": round(c.server_cpu * 1e6 / self.delivered.max(1) as f64),
            "server_rss_kib_base": c.rss_base,
            "server_rss_kib_connected": c.rss_connected,
            "server_rss_kib_end": c.rss_end,
            "server_rss_kib_per_connection": round(rss_per_conn),
            "loadgen_cpu_secs": round(c.own_cpu),
            "loadgen_cpu_us_per_delivery": round(c.own_cpu * 1e6 / self.delivered.max(1) as f64),
            "loadgen_rss_kib": crate::proc_stats::rss_of("self"),
            "window_secs": round(c.elapsed),
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
