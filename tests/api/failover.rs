//! Redis without a single point of failure: a master killed (`kill -9`) under Sentinel
//! and in a Cluster (plain and sharded pub/sub), while viewers watch and a tenant
//! publishes. What users rely on is asserted, not timed:
//! - every viewer: messages in order, never twice, every message that Redis delivered
//!   to chat-sync (the publish reached a subscriber) received, nothing that was not
//!   published;
//! - the viewers of the sessions whose subscription was on the killed master get one
//!   `reset` for the gap, the others none;
//! - `/readyz` is 503 during the gap and 200 after it;
//! - the tenant is billed exactly what the viewers received, per session.
//!
//! The time from the kill to the first message delivered after it is printed.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::common::cluster::RedisCluster;
use crate::common::sentinel::{MASTER_NAME, SentinelGroup};
use crate::common::tenant::Tenant;
use crate::common::{
    ServerProcess, Subscriber, batch, chat, get, patient, seq_of, sse_path, wait_billing_settled,
    wait_until,
};

/// Viewers per session.
const VIEWERS: usize = 2;
/// Messages each session must receive after the failover before publishing stops.
const AFTER: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Message(u64),
    Reset,
}

/// What the publisher did, per session: every number it tried, and those that
/// reached a subscriber (with the time the publish started).
#[derive(Default)]
struct Published {
    tried: BTreeSet<u64>,
    /// Publishes that failed (Redis down).
    failed: usize,
    /// Publishes that reached no subscriber.
    unheard: usize,
    delivered: Vec<(u64, Instant)>,
}

/// How the test publishes, as a tenant would on that topology.
#[derive(Clone)]
enum Tenancy {
    /// Asks the sentinels for the master before each attempt after a failure.
    Sentinel(Vec<String>),
    Cluster {
        nodes: Vec<String>,
        sharded: bool,
    },
}

enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Tenancy {
    async fn connect(&self) -> Option<Conn> {
        match self {
            Self::Sentinel(sentinels) => {
                let port = master_port(sentinels).await?;
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let conn = client
                    .get_multiplexed_async_connection_with_config(&patient())
                    .await
                    .ok()?;
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

    async fn publish(
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

async fn master_port(sentinels: &[String]) -> Option<u16> {
    for url in sentinels {
        let Ok(client) = redis::Client::open(url.as_str()) else {
            continue;
        };
        let Ok(mut conn) = client
            .get_multiplexed_async_connection_with_config(&patient())
            .await
        else {
            continue;
        };
        let answer: redis::RedisResult<Option<(String, u16)>> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query_async(&mut conn)
            .await;
        if let Ok(Some((_, port))) = answer {
            return Some(port);
        }
    }
    None
}

/// One show on one chat-sync instance: viewers, a publisher and a readiness probe.
struct Show {
    server: ServerProcess,
    sessions: Vec<Uuid>,
    seen: Vec<Vec<Arc<Mutex<Vec<Seen>>>>>,
    published: Arc<Mutex<Vec<Published>>>,
    readiness: Arc<Mutex<Vec<(Instant, u16)>>>,
    publishing: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Show {
    async fn start(vars: &[(&str, &str)], sessions: Vec<Uuid>, tenancy: Tenancy) -> Self {
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
        tasks.push(tokio::spawn(publish(
            tenancy,
            sessions.clone(),
            published.clone(),
            publishing.clone(),
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
            stop,
            tasks,
        }
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
    async fn wait_flowing(&self, n: usize, since: Instant) {
        let deadline = Instant::now() + crate::common::WAIT;
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
    async fn wait_ready(&self, since: Instant) {
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
    async fn finish(&mut self) {
        self.publishing.store(false, Ordering::Release);
        let publisher = self.tasks.remove(self.sessions.len() * VIEWERS);
        publisher.await.unwrap();
        let deadline = Instant::now() + crate::common::WAIT;
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
    fn first_delivery_after(&self, kill: Instant, affected: &[bool]) -> Option<Duration> {
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
async fn publish(
    tenancy: Tenancy,
    sessions: Vec<Uuid>,
    published: Arc<Mutex<Vec<Published>>>,
    publishing: Arc<AtomicBool>,
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

/// The checks of the module docs. `affected`: sessions whose subscription was on the
/// killed master.
async fn assert_exact(show: &Show, tenant: &Tenant, affected: &[bool], kill: Instant) {
    let received = assert_delivered(show, affected);
    assert_ready_again(show, kill);
    wait_billing_settled(|series| show.server.metric(series)).await;
    for (i, session) in show.sessions.iter().enumerate() {
        assert_eq!(
            tenant.total(*session),
            received[i],
            "session {i}: billed {} for {} received",
            tenant.total(*session),
            received[i]
        );
    }
}

/// Order, exactly once, nothing lost that reached chat-sync, nothing invented, one
/// `reset` where the subscription was lost. Returns how many messages each session's
/// viewers received (all the same).
fn assert_delivered(show: &Show, affected: &[bool]) -> Vec<u64> {
    let published = show.published.lock().unwrap();
    let mut received = Vec::new();
    for (i, viewers) in show.seen.iter().enumerate() {
        let delivered: BTreeSet<u64> = published[i].delivered.iter().map(|(s, _)| *s).collect();
        let mut sets = Vec::new();
        for log in viewers {
            let log = log.lock().unwrap();
            let got: Vec<u64> = log
                .iter()
                .filter_map(|s| match s {
                    Seen::Message(seq) => Some(*seq),
                    Seen::Reset => None,
                })
                .collect();
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "session {i}: a message repeated or out of order: {got:?}"
            );
            let got: BTreeSet<u64> = got.into_iter().collect();
            let missing: Vec<&u64> = delivered.difference(&got).collect();
            assert!(
                missing.is_empty(),
                "session {i}: delivered to chat-sync, never received: {missing:?}"
            );
            let invented: Vec<&u64> = got.difference(&published[i].tried).collect();
            assert!(
                invented.is_empty(),
                "session {i}: received, never published: {invented:?}"
            );
            let resets = log.iter().filter(|s| **s == Seen::Reset).count();
            assert_eq!(
                resets,
                usize::from(affected[i]),
                "session {i} (on the killed master: {}): {resets} resets in {log:?}",
                affected[i]
            );
            sets.push(got);
        }
        assert!(
            sets.windows(2).all(|w| w[0] == w[1]),
            "session {i}: its viewers received different messages"
        );
        received.push(sets[0].len() as u64);
    }
    received
}

/// `/readyz` said 503 after the kill, and says 200 now.
fn assert_ready_again(show: &Show, kill: Instant) {
    let readiness = show.readiness.lock().unwrap();
    assert!(
        readiness.iter().any(|(at, s)| *at > kill && *s == 503),
        "/readyz never said 503 after the kill"
    );
    assert_eq!(
        readiness.last().map(|(_, s)| *s),
        Some(200),
        "/readyz is not 200 after the failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sentinel_a_killed_master_costs_one_reset_and_nothing_else() {
    let mut group = SentinelGroup::start().await;
    let tenant = Tenant::start().await;
    let (sentinels, tenant_url) = (group.addresses(), tenant.base_url());
    let vars = [
        ("REDIS_SENTINELS", sentinels.as_str()),
        ("REDIS_SENTINEL_MASTER", MASTER_NAME),
        ("TENANT_BASE_URL", tenant_url.as_str()),
        ("BILLING_FLUSH_MS", "200"),
        ("TICK_MS", "10"),
    ];
    let sessions: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let urls = group.sentinels.iter().map(|s| s.url()).collect();
    let mut show = Show::start(&vars, sessions, Tenancy::Sentinel(urls)).await;
    let start = Instant::now();
    show.wait_flowing(5, start).await;

    let old = group.master_port().await.unwrap();
    let kill = Instant::now();
    group.master().await.kill();
    wait_until("the sentinels name the replica", || async {
        group.master_port().await.is_some_and(|p| p != old)
    })
    .await;
    show.wait_flowing(AFTER, kill).await;
    show.wait_ready(kill).await;
    // The old master comes back as a replica of the new one: it must not deliver a
    // second copy of anything.
    group
        .nodes
        .iter_mut()
        .find(|n| n.port == old)
        .unwrap()
        .restart()
        .await;
    let back = Instant::now();
    show.wait_flowing(AFTER, back).await;
    show.finish().await;
    eprintln!(
        "sentinel failover: a message was delivered again {:?} after the kill",
        show.first_delivery_after(kill, &[true; 4]).unwrap()
    );
    assert_exact(&show, &tenant, &[true; 4], kill).await;
}

async fn cluster_failover(sharded: bool) {
    let mut cluster = RedisCluster::start().await;
    let tenant = Tenant::start().await;
    let (nodes, tenant_url) = (cluster.addresses(), tenant.base_url());
    let mut vars = vec![
        ("REDIS_CLUSTER_NODES", nodes.as_str()),
        ("TENANT_BASE_URL", tenant_url.as_str()),
        ("BILLING_FLUSH_MS", "200"),
        ("TICK_MS", "10"),
    ];
    if sharded {
        vars.push(("REDIS_SHARDED_PUBSUB", "true"));
    }
    // Two sessions whose channels hash to each master.
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "three masters");
    let mut sessions: Vec<Uuid> = Vec::new();
    let mut per_master: HashMap<u16, usize> = HashMap::new();
    while sessions.len() < 6 {
        let session = Uuid::new_v4();
        let master = cluster.master_of(&session.to_string()).await;
        let n = per_master.entry(master).or_default();
        if *n < 2 {
            *n += 1;
            sessions.push(session);
        }
    }
    let tenancy = Tenancy::Cluster {
        nodes: cluster.nodes.iter().map(|n| n.url()).collect(),
        sharded,
    };
    let mut show = Show::start(&vars, sessions.clone(), tenancy).await;
    show.wait_flowing(5, Instant::now()).await;

    // Where each session's subscription is: the node that counts it.
    let victim = cluster.master_of(&sessions[0].to_string()).await;
    let mut affected = Vec::new();
    for session in &sessions {
        let mut conn = cluster.node(victim).conn().await;
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg(if sharded { "SHARDNUMSUB" } else { "NUMSUB" })
            .arg(session.to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
        affected.push(n > 0);
    }
    assert!(
        affected[0],
        "session 0's subscription is on its slot's master"
    );
    let kill = Instant::now();
    cluster.node(victim).kill();
    show.wait_flowing(AFTER, kill).await;
    show.wait_ready(kill).await;
    show.finish().await;
    eprintln!(
        "cluster failover (sharded pub/sub: {sharded}): the killed master's sessions had a \
         message again {:?} after the kill",
        show.first_delivery_after(kill, &affected).unwrap(),
    );
    assert_exact(&show, &tenant, &affected, kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_killed_master_costs_its_sessions_one_reset_and_nothing_else() {
    cluster_failover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sharded_pub_sub_a_killed_master_costs_its_sessions_one_reset_and_nothing_else() {
    cluster_failover(true).await;
}
