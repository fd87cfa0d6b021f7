//! A seeded random walk over the core (broker, registry, ticker, replay) with the ticks
//! under the test's control: publishes, ticks, connects, disconnects, resumes with
//! `Last-Event-ID` and reads interleave at random. Every subscriber's received sequence
//! must be exactly the published sequence for the time it was connected: contiguous,
//! in order, no duplicate, starting at the first message not yet captured when it
//! connected, and broken only where it was told so by a `reset`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_sync::broker::{Broker, Sink, chat_channel};
use chat_sync::fanout::{Ticker, Usage};
use chat_sync::history::History;
use chat_sync::metrics::Metrics;
use chat_sync::registry::{Limits, Registry};
use chat_sync::session::Sessions;
use chat_sync::subscription::Subscription;
use uuid::Uuid;

/// Every viewer of the walk connects from here.
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Counts what the ticker captured, as billing would.
#[derive(Default)]
struct Captured(AtomicU64);

impl Usage for Captured {
    fn captured(&self, _: Uuid, payloads: &[Bytes]) {
        self.0.fetch_add(payloads.len() as u64, Ordering::SeqCst);
    }
    fn closed(&self, _: Uuid) {}
}

/// xorshift64*: a seeded, dependency-free generator, so a failure names its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// One viewer across its connections.
struct Viewer {
    live: Option<Subscription>,
    last_event_id: Option<String>,
    /// Position, among the messages the session accepted, of the next one this viewer
    /// must receive.
    expect: u64,
    received: u64,
}

impl Viewer {
    /// Applies one chunk of the SSE stream to the viewer's expectations.
    fn absorb(&mut self, chunk: &[u8], captured: u64, accepted: &[u64], seed: u64) {
        let text = std::str::from_utf8(chunk).unwrap();
        for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
            let mut name = "message";
            let mut data = "";
            for line in event.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    self.last_event_id = Some(id.to_string());
                } else if let Some(n) = line.strip_prefix("event: ") {
                    name = n;
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d;
                }
            }
            if line_is_only_meta(event) {
                continue;
            }
            match name {
                "reset" => self.expect = captured,
                "message" => {
                    let batch: Vec<String> = serde_json::from_str(data).unwrap();
                    for payload in batch {
                        let n: u64 = payload.strip_prefix('m').unwrap().parse().unwrap();
                        assert_eq!(
                            Some(&n),
                            accepted.get(self.expect as usize),
                            "seed {seed}: gap, duplicate or reorder"
                        );
                        self.expect += 1;
                        self.received += 1;
                    }
                }
                other => panic!("seed {seed}: unexpected {other} event"),
            }
        }
    }

    fn drain(&mut self, captured: u64, accepted: &[u64], seed: u64) {
        let Some(sub) = self.live.as_mut() else {
            return;
        };
        let mut chunks = Vec::new();
        loop {
            match sub.try_next_frame() {
                Ok(Some(frame)) => chunks.push(frame),
                Ok(None) => break,
                Err(e) => panic!("seed {seed}: {e:?}"),
            }
        }
        for chunk in chunks {
            self.absorb(&chunk, captured, accepted, seed);
        }
    }
}

/// `retry:` advice and heartbeat comments carry no data.
fn line_is_only_meta(event: &str) -> bool {
    event
        .lines()
        .all(|l| l.starts_with("retry: ") || l.starts_with(':'))
}

async fn walk(seed: u64) {
    let metrics = Arc::new(Metrics::new());
    let sessions = Arc::new(Sessions::new(1 << 20, 1 << 30, metrics.clone()));
    let sink: Sink = {
        let sessions = sessions.clone();
        Arc::new(move |event| sessions.on_broker_event(event))
    };
    let broker = Broker::memory(sink);
    let limits = Limits {
        max_connections: 1000,
        max_connections_per_session: 1000,
        max_sessions: 10,
        subscriber_buffer: 4096,
        replay_batches: 6,
        replay_bytes: 1 << 20,
        session_grace: Duration::from_secs(3600),
        ended_ttl: Duration::from_secs(3600),
        client_retry: Duration::from_secs(1),
        max_streams_per_client: usize::MAX,
        new_sessions_per_client: u32::MAX,
    };
    let history = Arc::new(History::disabled(metrics.clone()));
    let registry = Arc::new(Registry::new(
        sessions,
        broker.clone(),
        history.clone(),
        limits,
        metrics,
    ));
    let captured = Arc::new(Captured::default());
    let ticker = Ticker {
        registry: registry.clone(),
        tick: Duration::from_millis(10),
        heartbeat: Duration::from_secs(3600),
        usage: captured.clone(),
        history,
    };
    let room = Uuid::new_v4();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut published = 0u64;
    // Message numbers the session accepted (a publish before the first subscriber, like
    // one to Redis, reaches no one).
    let mut accepted: Vec<u64> = Vec::new();
    let mut viewers: Vec<Viewer> = Vec::new();
    let mut handles = Vec::new();
    let count = |c: &Captured| c.0.load(Ordering::SeqCst);

    for _ in 0..1500 {
        match rng.below(100) {
            0..40 => {
                let payload = Bytes::from(format!("m{published}"));
                if broker.publish(chat_channel(room), payload).await.unwrap() > 0 {
                    accepted.push(published);
                }
                published += 1;
            }
            40..55 => ticker.tick_once(&mut handles, Instant::now()),
            55..62 if viewers.iter().filter(|v| v.live.is_some()).count() < 6 => {
                let sub = registry.attach(room, None, LOCAL).await.unwrap();
                let mut viewer = Viewer {
                    live: Some(sub),
                    last_event_id: None,
                    expect: count(&captured),
                    received: 0,
                };
                // The prelude is there at once.
                viewer.drain(count(&captured), &accepted, seed);
                viewers.push(viewer);
            }
            62..70 => {
                if let Some(v) = pick(&mut rng, &mut viewers, |v| v.live.is_some()) {
                    v.drain(count(&captured), &accepted, seed);
                    v.live = None;
                }
            }
            70..80 => {
                if let Some(v) = pick(&mut rng, &mut viewers, |v| v.live.is_none()) {
                    if v.last_event_id.is_none() {
                        // Nothing to resume from: like any new viewer, it starts live.
                        v.expect = count(&captured);
                    }
                    let sub = registry
                        .attach(room, v.last_event_id.as_deref(), LOCAL)
                        .await
                        .unwrap();
                    v.live = Some(sub);
                    v.drain(count(&captured), &accepted, seed);
                }
            }
            _ => {
                if let Some(v) = pick(&mut rng, &mut viewers, |v| v.live.is_some()) {
                    v.drain(count(&captured), &accepted, seed);
                }
            }
        }
    }
    ticker.tick_once(&mut handles, Instant::now());
    assert_eq!(
        count(&captured),
        accepted.len() as u64,
        "seed {seed}: every message captured once"
    );
    assert!(
        accepted.len() as u64 > published / 2,
        "seed {seed}: the session was mostly live"
    );
    for v in viewers.iter_mut().filter(|v| v.live.is_some()) {
        v.drain(count(&captured), &accepted, seed);
        assert_eq!(
            v.expect,
            accepted.len() as u64,
            "seed {seed}: a connected viewer is caught up"
        );
    }
    assert!(
        viewers.iter().any(|v| v.received > 0),
        "seed {seed}: the walk delivered something"
    );
}

fn pick<'a>(
    rng: &mut Rng,
    viewers: &'a mut [Viewer],
    filter: impl Fn(&Viewer) -> bool,
) -> Option<&'a mut Viewer> {
    let candidates: Vec<usize> = (0..viewers.len())
        .filter(|&i| filter(&viewers[i]))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let i = candidates[rng.below(candidates.len() as u64) as usize];
    Some(&mut viewers[i])
}

#[tokio::test]
async fn random_interleavings_deliver_exactly_the_published_sequence() {
    for seed in 1..=40 {
        walk(seed).await;
    }
}
