//! A show on one chat-sync instance, for the failover tests: viewers that log every
//! message and `reset`, a tenant publishing as it would on the topology (through
//! Sentinel, or with a cluster client), and a readiness probe.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::sentinel::master_port;
use super::{
    ServerProcess, Subscriber, WAIT, batch, chat, get, seq_of, sse_path, try_conn, wait_until,
};

/// Viewers per session.
pub const VIEWERS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Message(u64),
    Reset,
}

/// What the publisher did, per session: every number it tried, and those that
/// reached a subscriber (with the time the publish started).
#[derive(Default)]
pub struct Published {
    pub tried: BTreeSet<u64>,
    /// Publishes that failed (Redis down).
    pub failed: usize,
    /// Publishes that reached no subscriber.
    pub unheard: usize,
    pub delivered: Vec<(u64, Instant)>,
}

/// How the test publishes, as a tenant would on that topology.
#[derive(Clone)]
pub enum Tenancy {
    /// Asks the sentinels for the master before each attempt after a failure.
    Sentinel(Vec<String>),
    Cluster {
        nodes: Vec<String>,
        sharded: bool,
    },
}

pub enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Tenancy {
    pub async fn connect(&self) -> Option<Conn> {
        match self {
            Self::Sentinel(sentinels) => {
                let port = master_port(sentinels).await?;
                let conn = try_conn(&format!("redis://127.0.0.1:{port}")).await?;
                Some(Conn::Single(conn))
            }
            Self::Cluster { nodes, .. } => redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .response_timeout(Duration::from_secs(30))
                .build()
                .ok()?
                .get_async_connection()
                .await
                .ok()
                .map(Conn::Cluster),
        }
    }

    pub async fn publish(
        &self,
        conn: &mut Conn,
        channel: &str,
        payload: &str,
    ) -> redis::RedisResult<u64> {
        let sharded = matches!(self, Self::Cluster { sharded: true, .. });
        let mut cmd = redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(channel).arg(payload);
        match conn {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// One show on one chat-sync instance: viewers, a publisher and a readiness probe.
pub struct Show {
    pub server: ServerProcess,
    pub sessions: Vec<Uuid>,
    pub seen: Vec<Vec<Arc<Mutex<Vec<Seen>>>>>,
    pub published: Arc<Mutex<Vec<Published>>>,
    pub readiness: Arc<Mutex<Vec<(Instant, u16)>>>,
    pub publishing: Arc<AtomicBool>,
    /// Held by the publisher for each publish; see [`Show::quiesce`].
    gate: Arc<tokio::sync::Mutex<()>>,
    pub stop: Arc<AtomicBool>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Show {
    pub async fn start(vars: &[(&str, &str)], sessions: Vec<Uuid>, tenancy: Tenancy) -> Self {
        let server = ServerProcess::spawn(vars).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut seen = Vec::new();
        for session in &sessions {
            let mut per_session = Vec::new();
            for _ in 0..VIEWERS {
                let log = Arc::new(Mutex::new(Vec::new()));
                let mut viewer = Subscriber::connect(&server.url(&sse_path(*session)), None).await;
                assert_eq!(viewer.status, 200);
                let (log2, stop2) = (log.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop2.load(Ordering::Acquire) {
                        let event = match viewer.next_event_within(Duration::from_millis(100)).await
                        {
                            None => continue,
                            Some(None) => {
                                log2.lock().unwrap().push(Seen::Reset);
                                panic!("a viewer's stream closed during the failover");
                            }
                            Some(Some(event)) => event,
                        };
                        let mut log = log2.lock().unwrap();
                        match event.event.as_str() {
                            "reset" => log.push(Seen::Reset),
                            "message" => log.extend(
                                batch(&event)
                                    .iter()
                                    .map(|p| Seen::Message(seq_of(p).1 as u64)),
                            ),
                            other => panic!("unexpected {other} event"),
                        }
                    }
                }));
                per_session.push(log);
            }
            seen.push(per_session);
        }
        let published = Arc::new(Mutex::new(
            (0..sessions.len()).map(|_| Published::default()).collect(),
        ));
        let publishing = Arc::new(AtomicBool::new(true));
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        tasks.push(tokio::spawn(publish(
            tenancy,
            sessions.clone(),
            published.clone(),
            publishing.clone(),
            gate.clone(),
        )));
        let readiness = Arc::new(Mutex::new(Vec::new()));
        tasks.push(tokio::spawn({
            let (url, readiness, stop) = (server.url("/readyz"), readiness.clone(), stop.clone());
            async move {
                while !stop.load(Ordering::Acquire) {
                    if let Ok(r) = get(&url).await {
                        readiness
                            .lock()
                            .unwrap()
                            .push((Instant::now(), r.status().as_u16()));
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }));
        Self {
            server,
            sessions,
            seen,
            published,
            readiness,
            publishing,
            gate,
            stop,
            tasks,
        }
    }

    /// Pauses publishing (until the guard is dropped) once every message whose publish
    /// Redis acknowledged has reached every viewer, so that a node killed now loses
    /// nothing chat-sync was sent. `PUBLISH` counts its receivers when it queues the
    /// message, so one still in a killed node's output buffer is lost with the node:
    /// chat-sync never gets it and cannot deliver it (its viewers are told of the gap
    /// by the `reset`), yet the publisher would count it as having reached chat-sync.
    pub async fn quiesce(&self) -> tokio::sync::OwnedMutexGuard<()> {
        let quiet = self.gate.clone().lock_owned().await;
        wait_until(
            "every acknowledged message has reached every viewer",
            || async { self.missing().is_empty() },
        )
        .await;
        quiet
    }

    /// How many messages a viewer of session `i` received whose publish was after
    /// `since`.
    fn received_after(&self, i: usize, since: Instant) -> usize {
        let delivered: BTreeSet<u64> = self.published.lock().unwrap()[i]
            .delivered
            .iter()
            .filter(|(_, at)| *at > since)
            .map(|(seq, _)| *seq)
            .collect();
        self.seen[i]
            .iter()
            .map(|log| {
                log.lock()
                    .unwrap()
                    .iter()
                    .filter(|s| matches!(s, Seen::Message(seq) if delivered.contains(seq)))
                    .count()
            })
            .min()
            .unwrap_or(0)
    }

    /// Until every viewer has `n` messages published after `since`.
    pub async fn wait_flowing(&self, n: usize, since: Instant) {
        let deadline = Instant::now() + WAIT;
        while !(0..self.sessions.len()).all(|i| self.received_after(i, since) >= n) {
            assert!(
                Instant::now() < deadline,
                "messages do not flow again; per session: {}",
                self.report(since)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the publisher and the viewers saw since `since`, for a failure message.
    fn report(&self, since: Instant) -> String {
        let published = self.published.lock().unwrap();
        (0..self.sessions.len())
            .map(|i| {
                let p = &published[i];
                format!(
                    "[{i}: {} delivered to chat-sync, {} reached no subscriber, {} failed, {} received]",
                    p.delivered.iter().filter(|(_, at)| *at > since).count(),
                    p.unheard,
                    p.failed,
                    self.received_after(i, since)
                )
            })
            .collect()
    }

    /// Until `/readyz` says 200 again after `since`.
    pub async fn wait_ready(&self, since: Instant) {
        wait_until("/readyz is 200 again", || async {
            self.readiness
                .lock()
                .unwrap()
                .last()
                .is_some_and(|(at, s)| *at > since && *s == 200)
        })
        .await;
    }

    /// Stops publishing, waits for every delivered message to arrive, stops the rest.
    pub async fn finish(&mut self) {
        self.publishing.store(false, Ordering::Release);
        let publisher = self.tasks.remove(self.sessions.len() * VIEWERS);
        publisher.await.unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let missing = self.missing();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "delivered to chat-sync, never received (session, seq): {:?}",
                missing
                    .iter()
                    .map(|(i, seq, _)| (i, seq))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.store(true, Ordering::Release);
        for task in self.tasks.drain(..) {
            task.await.unwrap();
        }
    }

    /// Messages that reached chat-sync but not every viewer of their session.
    fn missing(&self) -> Vec<(usize, u64, Instant)> {
        let published = self.published.lock().unwrap();
        let mut missing = Vec::new();
        for (i, viewers) in self.seen.iter().enumerate() {
            let got: Vec<BTreeSet<u64>> = viewers
                .iter()
                .map(|v| messages(&v.lock().unwrap()))
                .collect();
            for (seq, at) in &published[i].delivered {
                if !got.iter().all(|g| g.contains(seq)) {
                    missing.push((i, *seq, *at));
                }
            }
        }
        missing
    }

    /// How long after the kill the first message was delivered, of a publish started
    /// after it, to a viewer of one of the `affected` sessions.
    pub fn first_delivery_after(&self, kill: Instant, affected: &[bool]) -> Option<Duration> {
        let published = self.published.lock().unwrap();
        published
            .iter()
            .zip(affected)
            .filter(|(_, a)| **a)
            .flat_map(|(p, _)| p.delivered.iter())
            .filter(|(_, at)| *at > kill)
            .map(|(_, at)| at.duration_since(kill))
            .min()
    }
}

fn messages(log: &[Seen]) -> BTreeSet<u64> {
    log.iter()
        .filter_map(|s| match s {
            Seen::Message(seq) => Some(*seq),
            Seen::Reset => None,
        })
        .collect()
}

/// Round-robin over the sessions, ~200 messages/s, each number tried once: one that
/// failed (Redis down) is not published and never sent again, as a tenant that drops
/// a message it could not publish.
pub async fn publish(
    tenancy: Tenancy,
    sessions: Vec<Uuid>,
    published: Arc<Mutex<Vec<Published>>>,
    publishing: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Mutex<()>>,
) {
    let mut conn: Option<Conn> = None;
    // As a tenant's client with a periodic topology refresh (Lettuce's, say): the
    // crate's cluster client learns a new slot owner only from a MOVED reply, which a
    // dead master never sends.
    let mut refreshed = Instant::now();
    let mut next = vec![0u64; sessions.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut i = 0;
    while publishing.load(Ordering::Acquire) {
        tick.tick().await;
        let _open = gate.lock().await;
        i = (i + 1) % sessions.len();
        if conn.is_none() || refreshed.elapsed() > Duration::from_millis(500) {
            conn = tenancy.connect().await;
            refreshed = Instant::now();
        }
        let Some(c) = conn.as_mut() else { continue };
        let seq = next[i];
        next[i] += 1;
        published.lock().unwrap()[i].tried.insert(seq);
        let payload = chat(&format!("s{i}"), seq as usize);
        let started = Instant::now();
        match tenancy.publish(c, &sessions[i].to_string(), &payload).await {
            Ok(receivers) if receivers > 0 => {
                published.lock().unwrap()[i].delivered.push((seq, started))
            }
            Ok(_) => published.lock().unwrap()[i].unheard += 1,
            Err(_) => {
                published.lock().unwrap()[i].failed += 1;
                conn = None;
            }
        }
    }
}
