//! The random walk of `model`, over two instances on one redis-server: publishes
//! (through Redis), ticks of either instance (under the test's control), connects to
//! either, disconnects, and viewers moving from one instance to the other with their
//! `Last-Event-ID`. The second instance may start serving the session midway (it joins
//! the shared history, answered by the first). Every viewer's sequence, across its
//! moves, must be exactly the published one from its first message on: contiguous,
//! in order, no duplicate, and no `reset` (nothing is ever lost here).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_sync::broker::{Broker, Sink};
use chat_sync::class::Asked;
use chat_sync::config::Config;
use chat_sync::fanout::{Ticker, Usage};
use chat_sync::history::History;
use chat_sync::metrics::Metrics;
use chat_sync::registry::{Limits, Registry};
use chat_sync::session::Sessions;
use chat_sync::subscription::Subscription;
use chat_sync::topology::Redis;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::common::{RedisServer, WAIT};
use crate::model::Rng;

const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

struct NoUsage;

impl Usage for NoUsage {
    fn captured(&self, _: Uuid, _: &[bytes::Bytes]) {}
    fn closed(&self, _: Uuid) {}
}

/// One instance's core, ticked by the test; its history writes run by themselves.
struct Instance {
    registry: Arc<Registry>,
    ticker: Ticker,
}

impl Instance {
    fn start(redis: &RedisServer, tasks: &TaskTracker, token: &CancellationToken) -> Self {
        let url = redis.url();
        let config = Config::from_lookup(|k| match k {
            "REDIS_URL" => Some(url.clone()),
            "REPLAY_BATCHES" => Some("100000".into()),
            "SESSION_GRACE_MS" => Some("3600000".into()),
            _ => None,
        })
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let sessions = Arc::new(Sessions::new(1 << 20, 1 << 30, metrics.clone()));
        let redis = Redis::start(config.redis.clone().unwrap(), tasks, token.clone());
        let history = Arc::new(
            History::new(
                &config,
                Some(&redis),
                tasks,
                sessions.clone(),
                metrics.clone(),
            )
            .unwrap(),
        );
        let sink: Sink = {
            let (sessions, history) = (sessions.clone(), history.clone());
            Arc::new(move |event| {
                history.on_broker_event(&event);
                sessions.on_broker_event(event);
            })
        };
        let broker = Broker::redis(&redis, sink, false, tasks, token.clone()).unwrap();
        let mut limits = Limits::from(&config);
        limits.max_streams_per_client = usize::MAX;
        limits.new_sessions_per_client = u32::MAX;
        let registry = Arc::new(Registry::new(
            sessions,
            broker,
            history.clone(),
            limits,
            metrics,
        ));
        tasks.spawn(history.clone().run(Duration::from_millis(5), token.clone()));
        let ticker = Ticker {
            registry: registry.clone(),
            tick: Duration::from_millis(5),
            heartbeat: Duration::from_secs(3600),
            usage: Arc::new(NoUsage),
            history,
        };
        Self { registry, ticker }
    }

    fn tick(&self) {
        self.ticker.tick_once(&mut Vec::new(), Instant::now(), 1);
    }
}

/// One viewer across its connections and moves.
struct Viewer {
    live: Option<(usize, Subscription)>,
    last_event_id: Option<String>,
    /// The next message number it must get; `None` until its first one.
    expect: Option<u64>,
    moves: u32,
}

impl Viewer {
    fn drain(&mut self, seed: u64) {
        let Some((_, sub)) = self.live.as_mut() else {
            return;
        };
        while let Some(frame) = sub
            .try_next_frame()
            .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"))
        {
            for event in std::str::from_utf8(&frame).unwrap().split("\n\n") {
                let mut data = None;
                for line in event.lines() {
                    if let Some(id) = line.strip_prefix("id: ") {
                        self.last_event_id = Some(id.to_string());
                    } else if let Some(name) = line.strip_prefix("event: ") {
                        panic!("seed {seed}: unexpected {name} event: {event}");
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(d);
                    }
                }
                let Some(data) = data else { continue };
                for payload in serde_json::from_str::<Vec<String>>(data).unwrap() {
                    let n: u64 = payload.strip_prefix('m').unwrap().parse().unwrap();
                    if let Some(expect) = self.expect {
                        assert_eq!(
                            n, expect,
                            "seed {seed}: gap, duplicate or reorder after {} moves",
                            self.moves
                        );
                    }
                    self.expect = Some(n + 1);
                }
            }
        }
    }
}

/// Attaches while ticking both instances: a session joining the history waits for
/// the other instance to capture its request.
async fn attach(
    instances: &[Instance],
    at: usize,
    room: Uuid,
    last: Option<String>,
) -> Subscription {
    let registry = instances[at].registry.clone();
    let mut attach = tokio::spawn(async move {
        registry
            .attach(room, last.as_deref(), LOCAL, Asked::default())
            .await
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        instances.iter().for_each(Instance::tick);
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(2), &mut attach).await {
            return done.unwrap().unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "attach did not finish"
        );
    }
}

async fn walk(seed: u64) {
    let redis = RedisServer::start().await;
    let (tasks, token) = (TaskTracker::new(), CancellationToken::new());
    let instances = [
        Instance::start(&redis, &tasks, &token),
        Instance::start(&redis, &tasks, &token),
    ];
    for i in &instances {
        let registry = i.registry.clone();
        crate::common::wait_until("the instance is connected", || {
            let registry = registry.clone();
            async move { registry.broker_connected() }
        })
        .await;
    }
    let room = Uuid::new_v4();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut viewers: Vec<Viewer> = Vec::new();
    // The first instance serves the session from the start; the second once a viewer
    // lands there.
    let first = attach(&instances, 0, room, None).await;
    viewers.push(Viewer {
        live: Some((0, first)),
        last_event_id: None,
        expect: Some(0),
        moves: 0,
    });
    let mut publisher = redis.conn().await;
    let mut published = 0u64;
    for _ in 0..400 {
        match rng.below(100) {
            0..35 => {
                let _: usize = redis::AsyncCommands::publish(
                    &mut publisher,
                    room.to_string(),
                    format!("m{published}"),
                )
                .await
                .unwrap();
                published += 1;
            }
            35..55 => instances[rng.below(2) as usize].tick(),
            55..60 if viewers.len() < 8 => {
                let at = rng.below(2) as usize;
                let sub = attach(&instances, at, room, None).await;
                viewers.push(Viewer {
                    live: Some((at, sub)),
                    last_event_id: None,
                    expect: None,
                    moves: 0,
                });
            }
            60..75 => {
                // Move: read what is there, leave, and resume on the other instance.
                let i = rng.below(viewers.len() as u64) as usize;
                let v = &mut viewers[i];
                v.drain(seed);
                if let Some((at, _)) = v.live.take()
                    && v.last_event_id.is_some()
                {
                    let sub = attach(&instances, 1 - at, room, v.last_event_id.clone()).await;
                    v.live = Some((1 - at, sub));
                    v.moves += 1;
                }
            }
            _ => {
                let i = rng.below(viewers.len() as u64) as usize;
                viewers[i].drain(seed);
            }
        }
    }
    // Every viewer still connected catches up to the last message.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        instances.iter().for_each(Instance::tick);
        for v in viewers.iter_mut() {
            v.drain(seed);
        }
        let behind = viewers
            .iter()
            .filter(|v| v.live.is_some() && v.expect.is_some_and(|e| e < published))
            .count();
        if behind == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {seed}: {behind} viewers never caught up"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        viewers.iter().any(|v| v.moves > 0 && v.live.is_some()),
        "seed {seed}: some viewer moved"
    );
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_and_moving_viewers_deliver_exactly_the_published_sequence() {
    for seed in 1..=10 {
        walk(seed).await;
    }
}
