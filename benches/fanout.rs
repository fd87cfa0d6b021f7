//! Capture + framing + fan-out of one tick, for 1 and 10,000 subscribers of a session:
//! 50 messages (a chat storm's batch at a 24 ms tick) are captured, framed once, and
//! every subscriber takes the shared frame from the ring, as its connection would.
//!
//! `cargo bench --bench fanout`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_sync::broker::{Broker, BrokerEvent, Sink};
use chat_sync::fanout::{Ticker, Usage};
use chat_sync::history::History;
use chat_sync::metrics::Metrics;
use chat_sync::registry::{Limits, Registry};
use chat_sync::session::Sessions;
use chat_sync::subscription::Subscription;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use uuid::Uuid;

struct NoUsage;

impl Usage for NoUsage {
    fn captured(&self, _: Uuid, _: &[Bytes]) {}
    fn closed(&self, _: Uuid) {}
}

const BATCH: usize = 50;

fn setup(subscribers: usize) -> (Ticker, Arc<Sessions>, Uuid, Vec<Subscription>) {
    let metrics = Arc::new(Metrics::new());
    let sessions = Arc::new(Sessions::new(1 << 20, 1 << 30, metrics.clone()));
    let sink: Sink = {
        let sessions = sessions.clone();
        Arc::new(move |e| sessions.on_broker_event(e))
    };
    let limits = Limits {
        max_connections: usize::MAX,
        max_connections_per_session: usize::MAX,
        max_sessions: 10,
        subscriber_buffer: 128,
        replay_batches: 512,
        replay_bytes: 4 << 20,
        session_grace: Duration::from_secs(3600),
        ended_ttl: Duration::from_secs(3600),
        client_retry: Duration::from_secs(2),
        max_streams_per_client: usize::MAX,
        new_sessions_per_client: u32::MAX,
    };
    let history = Arc::new(History::disabled(metrics.clone()));
    let registry = Arc::new(Registry::new(
        sessions.clone(),
        Broker::memory(sink),
        history.clone(),
        limits,
        metrics,
    ));
    let room = Uuid::new_v4();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let subs = (0..subscribers)
        .map(|_| {
            runtime
                .block_on(registry.attach(
                    room,
                    None,
                    std::net::Ipv4Addr::LOCALHOST.into(),
                    Default::default(),
                ))
                .unwrap()
        })
        .collect();
    let ticker = Ticker {
        registry,
        tick: Duration::from_millis(24),
        heartbeat: Duration::from_secs(3600),
        usage: Arc::new(NoUsage),
        history,
    };
    (ticker, sessions, room, subs)
}

fn tick(c: &mut Criterion) {
    let payloads: Vec<Bytes> = (0..BATCH)
        .map(|i| {
            Bytes::from(format!(
                r#"{{"id":"p{i}","nickname":"viewer {i}","profileImgUrl":"https://cdn.example.com/a.png","message":"hello number {i}","createdAt":"2026-11-24T10:15:30.123"}}"#
            ))
        })
        .collect();
    let mut group = c.benchmark_group("capture_frame_fanout");
    for subscribers in [1usize, 10_000] {
        let (ticker, sessions, room, mut subs) = setup(subscribers);
        let channel = room.to_string();
        let mut handles = Vec::new();
        group.throughput(Throughput::Elements((BATCH * subscribers) as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    for p in &payloads {
                        sessions.on_broker_event(BrokerEvent::Message {
                            channel: channel.as_bytes(),
                            payload: p.clone(),
                        });
                    }
                    ticker.tick_once(&mut handles, Instant::now(), 1);
                    for sub in &mut subs {
                        let frame = sub
                            .try_next_frame()
                            .expect("every subscriber gets the batch");
                        std::hint::black_box(frame);
                    }
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, tick);
criterion_main!(benches);
