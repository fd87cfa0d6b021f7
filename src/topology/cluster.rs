//! Following a Cluster's masters. The crate's cluster connection learns a new slot
//! owner only from a `MOVED` reply, so after a master dies (its connection is simply
//! refused) it keeps knocking on the dead node. One task asks the cluster for its
//! slot map every [`ASK_EVERY`]; when a range's master changes, each link sends one
//! command for that range to another master, whose `MOVED` makes the crate reload
//! the map and move the subscriptions of that range to the new master.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    Cmd, ConnectionInfo, FromRedisValue, IntoConnectionInfo, RedisConnectionInfo, RedisResult,
    Value,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Kind;

/// How often the slot map is read.
const ASK_EVERY: Duration = Duration::from_millis(500);

/// Which master serves each slot range: `(first, last, host, port)`, sorted.
pub type SlotMap = Vec<(u16, u16, String, u16)>;

/// Plain connections to single nodes, one per address, kept while they work: the slot
/// map is read and the masters are pinged every [`ASK_EVERY`], and a new connection
/// each time would be a stream of connects in every node's statistics.
#[derive(Default)]
pub(super) struct Direct {
    conns: tokio::sync::Mutex<HashMap<String, MultiplexedConnection>>,
    /// Replies may take as long as the caller waits (otherwise `ASK_EVERY`).
    patient: bool,
}

impl Direct {
    async fn query<T: FromRedisValue>(&self, node: &ConnectionInfo, cmd: &Cmd) -> RedisResult<T> {
        let key = node.addr().to_string();
        let cached = self.conns.lock().await.get(&key).cloned();
        let mut conn = match cached {
            Some(conn) => conn,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(ASK_EVERY))
                    .set_response_timeout((!self.patient).then_some(ASK_EVERY));
                let conn = redis::Client::open(node.clone())?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                self.conns.lock().await.insert(key.clone(), conn.clone());
                conn
            }
        };
        let result = cmd.query_async(&mut conn).await;
        if result.is_err() {
            self.conns.lock().await.remove(&key);
        }
        result
    }

    /// Forgets the connections to nodes that are not in `nodes`.
    async fn keep(&self, nodes: &[ConnectionInfo]) {
        let keys: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        self.conns.lock().await.retain(|k, _| keys.contains(k));
    }
}

/// Reads the slot map from any node that answers (the configured ones, then the
/// masters last seen) and publishes each change, until `token` is cancelled.
pub(super) async fn watch_slots(
    nodes: Vec<ConnectionInfo>,
    map: watch::Sender<Option<SlotMap>>,
    token: CancellationToken,
) {
    let direct = Direct::default();
    let login = nodes[0].redis_settings().clone();
    loop {
        let known = map
            .borrow()
            .as_ref()
            .map(|m| infos(&masters(m), &login))
            .unwrap_or_default();
        let candidates: Vec<ConnectionInfo> = nodes.iter().chain(&known).cloned().collect();
        direct.keep(&candidates).await;
        for node in &candidates {
            if let Ok(Ok(found)) = tokio::time::timeout(ASK_EVERY * 2, slots(&direct, node)).await {
                if map.borrow().as_ref() != Some(&found) {
                    map.send_replace(Some(found));
                }
                break;
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(ASK_EVERY) => {}
        }
    }
}

/// How to reach each of `masters`, logged in as `login`.
fn infos(masters: &[(String, u16)], login: &RedisConnectionInfo) -> Vec<ConnectionInfo> {
    masters
        .iter()
        .filter_map(|(host, port)| {
            redis::ConnectionAddr::Tcp(host.clone(), *port)
                .into_connection_info()
                .ok()
                .map(|info| info.set_redis_settings(login.clone()))
        })
        .collect()
}

async fn slots(direct: &Direct, node: &ConnectionInfo) -> RedisResult<SlotMap> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let entries: Vec<Vec<Value>> = direct.query(node, &cmd).await?;
    let mut map = SlotMap::new();
    for entry in entries {
        // first, last, [host, port, id, ...] of the master, then the replicas.
        let (Some(first), Some(last), Some(master)) = (entry.first(), entry.get(1), entry.get(2))
        else {
            continue;
        };
        let master: Vec<Value> = redis::from_redis_value_ref(master)?;
        let (Some(host), Some(port)) = (master.first(), master.get(1)) else {
            continue;
        };
        map.push((
            redis::from_redis_value_ref(first)?,
            redis::from_redis_value_ref(last)?,
            redis::from_redis_value_ref(host)?,
            redis::from_redis_value_ref(port)?,
        ));
    }
    map.sort();
    Ok(map)
}

/// The masters of a map, once each.
pub(super) fn masters(map: &SlotMap) -> Vec<(String, u16)> {
    let mut masters: Vec<(String, u16)> = map.iter().map(|(_, _, h, p)| (h.clone(), *p)).collect();
    masters.sort();
    masters.dedup();
    masters
}

/// For each range whose master changed from `before` to `after`, asks another master
/// about a key of that range: its `MOVED` reply makes `conn` reload the slot map
/// (and resubscribe where the slots went).
pub(super) async fn nudge(conn: &ClusterConnection, before: &SlotMap, after: &SlotMap) {
    let all = masters(after);
    for (first, last, host, port) in after {
        let unchanged = before
            .iter()
            .any(|(f, l, h, p)| f <= first && last <= l && h == host && p == port);
        if unchanged {
            continue;
        }
        let Some((other_host, other_port)) = all.iter().find(|(h, p)| (h, p) != (host, port))
        else {
            continue;
        };
        let Some(key) = key_in(*first, *last) else {
            continue;
        };
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(key);
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: other_host.clone(),
            port: *other_port,
        });
        tracing::info!(first, last, master = %format!("{host}:{port}"), "slots moved to another master");
        let mut conn = conn.clone();
        let _ = tokio::time::timeout(ASK_EVERY * 4, conn.route_command(cmd, route)).await;
    }
}

/// (Un)subscribes one channel per command, all at once: the crate sends a command to
/// the slot of its first channel and restores each channel at its own slot's master,
/// and a session's channels are in different slots (`<id>` and `<id>_END`, names the
/// tenant relies on). Sharded channels must be in the slot of the node anyway.
pub(super) async fn each_channel(
    conn: &ClusterConnection,
    kind: Kind,
    channels: &[String],
    subscribe: bool,
) -> RedisResult<()> {
    futures::future::try_join_all(channels.iter().map(|channel| {
        let mut c = conn.clone();
        async move {
            match (kind, subscribe) {
                (Kind::Channel, true) => c.subscribe(channel).await,
                (Kind::Channel, false) => c.unsubscribe(channel).await,
                (Kind::Pattern, true) => c.psubscribe(channel).await,
                (Kind::Pattern, false) => c.punsubscribe(channel).await,
                (Kind::Shard, true) => c.ssubscribe(channel).await,
                (Kind::Shard, false) => c.sunsubscribe(channel).await,
            }
        }
    }))
    .await
    .map(drop)
}

/// PINGs each master of a slot map, on connections of its own: a master that is down
/// (not yet replaced) fails it. Not through the cluster connection, which would take
/// the failed attempt as a reason to reload its slot map every time.
pub struct Pinger {
    direct: Direct,
    login: RedisConnectionInfo,
}

impl Pinger {
    pub(super) fn new(login: RedisConnectionInfo) -> Self {
        Self {
            // The health check times its PINGs itself, patiently: a reply that is late
            // because this process is busy does not mean the master is down.
            direct: Direct {
                patient: true,
                ..Direct::default()
            },
            login,
        }
    }

    pub(super) async fn ping_masters(&self, map: &SlotMap) -> RedisResult<()> {
        let nodes = infos(&masters(map), &self.login);
        self.direct.keep(&nodes).await;
        for node in &nodes {
            self.direct
                .query::<Value>(node, &redis::cmd("PING"))
                .await?;
        }
        Ok(())
    }
}

/// A key that hashes into `first..=last`.
fn key_in(first: u16, last: u16) -> Option<String> {
    (0..100_000)
        .map(|i| format!("chat-sync:slot:{i}"))
        .find(|key| (first..=last).contains(&slot(key.as_bytes())))
}

/// Redis Cluster's key slot: CRC16/XMODEM of the key (these keys have no hash tag).
fn slot(key: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in key {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // `CLUSTER KEYSLOT` of these, from Redis' documentation and a live server.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 12739);
        let key = key_in(100, 200).unwrap();
        assert!((100..=200).contains(&slot(key.as_bytes())));
    }
}
