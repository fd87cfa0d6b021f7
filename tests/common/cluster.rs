//! A Redis Cluster of three masters and three replicas on loopback ports, made with
//! `redis-cli --cluster create`, as an operator would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use super::redis_server::{RedisNode, server_args};
use super::{WAIT, free_port, try_conn, wait_until};

pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
    dir: PathBuf,
}

impl RedisCluster {
    pub async fn start() -> Self {
        for _ in 0..5 {
            if let Some(cluster) = Self::try_start().await {
                return cluster;
            }
        }
        panic!("could not create a Redis Cluster (redis-server and redis-cli must be on PATH)");
    }

    async fn try_start() -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("chat-sync-cluster-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        while nodes.len() < 6 {
            // The cluster bus listens on port + 10000.
            let port = free_port();
            if port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let (config, dir) = (format!("nodes-{port}.conf"), dir.display().to_string());
            let args = server_args(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &config,
                    "--cluster-node-timeout",
                    "1000",
                    "--repl-diskless-sync-delay",
                    "0",
                    "--appendonly",
                    "no",
                    "--dir",
                    &dir,
                ],
            );
            if let Some(node) = RedisNode::start(port, args).await {
                nodes.push(node);
            }
        }
        let cluster = Self { nodes, dir };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let created = tokio::task::spawn_blocking(move || create.output())
            .await
            .unwrap()
            .expect("redis-cli must be on PATH (.ci/run installs it)");
        if !created.status.success() {
            eprintln!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&created.stdout)
            );
            return None;
        }
        wait_until("every node sees the cluster ok", || async {
            for node in &cluster.nodes {
                if !node
                    .info(&["CLUSTER", "INFO"])
                    .await
                    .contains("cluster_state:ok")
                {
                    return false;
                }
            }
            true
        })
        .await;
        // A replica that never synced does not take over from its master.
        wait_until("every replica is in sync", || async {
            let mut synced = 0;
            for node in &cluster.nodes {
                synced += usize::from(node.in_sync().await);
            }
            synced == 3
        })
        .await;
        Some(cluster)
    }

    /// `REDIS_CLUSTER_NODES` for chat-sync.
    pub fn addresses(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A cluster client as a tenant backend would use.
    pub async fn client(&self) -> redis::cluster_async::ClusterConnection {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.url()).collect();
        redis::cluster::ClusterClientBuilder::new(nodes)
            .response_timeout(WAIT)
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }

    /// Which master port serves each slot range, from a node that is up.
    pub async fn masters(&self) -> HashMap<u16, Vec<(u16, u16)>> {
        for node in &self.nodes {
            let Some(mut conn) = try_conn(&node.url()).await else {
                continue;
            };
            // Each entry: from, to, [ip, port, id, ...] of the master, then replicas.
            let Ok(slots) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<Vec<redis::Value>>>(&mut conn)
                .await
            else {
                continue;
            };
            let mut masters: HashMap<u16, Vec<(u16, u16)>> = HashMap::new();
            for entry in slots {
                let number = |v: &redis::Value| redis::from_redis_value_ref::<u16>(v).unwrap();
                let master: Vec<redis::Value> = redis::from_redis_value_ref(&entry[2]).unwrap();
                masters
                    .entry(number(&master[1]))
                    .or_default()
                    .push((number(&entry[0]), number(&entry[1])));
            }
            return masters;
        }
        panic!("no cluster node answers");
    }

    /// The master port serving `key` (a channel name is hashed as a key), as Redis
    /// itself computes the slot (`CLUSTER KEYSLOT`).
    pub async fn master_of(&self, key: &str) -> u16 {
        let mut slot = None;
        for node in &self.nodes {
            if let Some(mut conn) = try_conn(&node.url()).await
                && let Ok(s) = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query_async::<u16>(&mut conn)
                    .await
            {
                slot = Some(s);
                break;
            }
        }
        let slot = slot.expect("a cluster node answers");
        self.masters()
            .await
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|(port, _)| port)
            .expect("every slot is served")
    }

    pub fn node(&mut self, port: u16) -> &mut RedisNode {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
