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
use std::time::Instant;

use uuid::Uuid;

use crate::common::cluster::RedisCluster;
use crate::common::sentinel::{MASTER_NAME, SentinelGroup};
use crate::common::show::{Seen, Show, Tenancy};
use crate::common::tenant::Tenant;
use crate::common::{wait_billing_settled, wait_until};

/// Messages each session must receive after the failover before publishing stops.
const AFTER: usize = 20;

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
    let quiet = show.quiesce().await;
    let kill = Instant::now();
    group.master().await.kill();
    drop(quiet);
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
    let quiet = show.quiesce().await;
    let kill = Instant::now();
    cluster.node(victim).kill();
    drop(quiet);
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
