//! A master, one replica and three sentinels on loopback ports: the smallest Sentinel
//! deployment that fails over (a quorum of two).

use std::path::PathBuf;
use std::time::Duration;

use super::redis_server::{RedisNode, server_args};
use super::{free_port, redis_conn, try_conn, wait_until};

pub const MASTER_NAME: &str = "chat-sync-master";

pub struct SentinelGroup {
    /// `[0]` the first master, `[1]` its replica.
    pub nodes: Vec<RedisNode>,
    pub sentinels: Vec<RedisNode>,
    dir: PathBuf,
}

impl SentinelGroup {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("chat-sync-sentinel-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let master = node(&dir, &[]).await;
        let replica = node(
            &dir,
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        )
        .await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(sentinel(&dir, master.port).await);
        }
        let group = Self {
            nodes: vec![master, replica],
            sentinels,
            dir,
        };
        // A failover needs the replica in sync and the sentinels aware of each other.
        wait_until("the replica is in sync", || async {
            group.nodes[1].in_sync().await
        })
        .await;
        for s in &group.sentinels {
            wait_until(
                "each sentinel knows the other two and the replica",
                || async {
                    let mut conn = redis_conn(&s.url()).await;
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("sentinels")
                        .arg(MASTER_NAME)
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("replicas")
                        .arg(MASTER_NAME)
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    others.len() == 2 && replicas.len() == 1
                },
            )
            .await;
        }
        group
    }

    /// `REDIS_SENTINELS` for chat-sync.
    pub fn addresses(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the master the sentinels name now.
    pub async fn master_port(&self) -> Option<u16> {
        let urls: Vec<String> = self.sentinels.iter().map(RedisNode::url).collect();
        master_port(&urls).await
    }

    /// The node that is master now.
    pub async fn master(&mut self) -> &mut RedisNode {
        let port = self
            .master_port()
            .await
            .expect("the sentinels name a master");
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("the master is one of ours")
    }
}

/// The port of the master that the first sentinel of `sentinels` to answer names, as a
/// tenant asks for it.
pub async fn master_port(sentinels: &[String]) -> Option<u16> {
    for url in sentinels {
        let Some(mut conn) = try_conn(url).await else {
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

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        self.sentinels.clear();
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn node(dir: &std::path::Path, extra: &[&str]) -> RedisNode {
    for _ in 0..20 {
        let port = free_port();
        let dir = dir.display().to_string();
        let mut args = server_args(
            port,
            &[
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &dir,
            ],
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        if let Some(node) = RedisNode::start(port, args).await {
            return node;
        }
    }
    panic!("could not start redis-server");
}

async fn sentinel(dir: &std::path::Path, master_port: u16) -> RedisNode {
    for _ in 0..20 {
        let port = free_port();
        let file = dir.join(format!("sentinel-{port}.conf"));
        // Sentinel rewrites its file, so each has its own.
        std::fs::write(
            &file,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\nloglevel warning\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n"
            ),
        )
        .unwrap();
        let args = vec![file.display().to_string(), "--sentinel".to_string()];
        if let Some(node) = RedisNode::start(port, args).await {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not start redis-server --sentinel");
}
