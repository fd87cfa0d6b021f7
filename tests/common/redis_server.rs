//! A real `redis-server` per test, on a free loopback port, that the test can kill and
//! restart on the same port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::AsyncCommands;

use super::{free_port, redis_conn};

/// What every test `redis-server` runs with (its port on loopback, nothing saved, no
/// protected mode, quiet logs), then `extra`.
pub fn server_args(port: u16, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let base = [
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--protected-mode",
        "no",
        "--loglevel",
        "warning",
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// A `redis-server` owned by one test; killed when dropped.
pub struct RedisServer {
    pub port: u16,
    node: RedisNode,
    /// Where an append-only file keeps the data across kills and restarts, if any.
    dir: Option<PathBuf>,
}

impl RedisServer {
    /// Without persistence: a restart comes back empty.
    pub async fn start() -> Self {
        Self::start_in(None).await
    }

    /// With `appendonly yes` and `appendfsync always`, as the README asks for the
    /// usage store: what it acknowledged survives `kill -9` and a restart.
    pub async fn start_persistent() -> Self {
        let dir = std::env::temp_dir().join(format!("chat-sync-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(Some(dir)).await
    }

    async fn start_in(dir: Option<PathBuf>) -> Self {
        for _ in 0..20 {
            let port = free_port();
            let dir_arg = dir.as_ref().map(|d| d.display().to_string());
            let args = match &dir_arg {
                Some(dir) => server_args(
                    port,
                    &[
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "always",
                        "--dir",
                        dir,
                    ],
                ),
                None => server_args(port, &["--appendonly", "no"]),
            };
            if let Some(node) = RedisNode::start(port, args).await {
                return Self { port, node, dir };
            }
        }
        panic!("could not start redis-server (is it installed? .ci/run installs it)");
    }

    /// Kills the server, as a crash would.
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.node.restart().await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis_conn(&self.url()).await
    }

    /// Publishes as a tenant backend would (`redis-cli PUBLISH`).
    pub async fn publish(&self, channel: &str, payload: &str) -> usize {
        self.conn().await.publish(channel, payload).await.unwrap()
    }

    /// Subscribers of a channel on the real server (`PUBSUB NUMSUB`).
    pub async fn numsub(&self, channel: &str) -> usize {
        let mut conn = self.conn().await;
        let (_, n): (String, usize) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        n
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One `redis-server` (or sentinel) process of a topology, on its own port, started
/// with `args`, that a test kills and starts again as it is.
pub struct RedisNode {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisNode {
    /// Starts it; `None` if it did not come up (the port was taken).
    pub async fn start(port: u16, args: Vec<String>) -> Option<Self> {
        let mut node = Self {
            port,
            args,
            child: None,
        };
        node.spawn().await.then_some(node)
    }

    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (.ci/run installs it)");
        self.child = Some(child);
        for _ in 0..400 {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            if ping(&self.url()).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.kill();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis_conn(&self.url()).await
    }

    /// What `command` (`INFO replication`, `CLUSTER INFO`) says; empty if it does not
    /// answer.
    pub async fn info(&self, command: &[&str]) -> String {
        let Some(mut conn) = super::try_conn(&self.url()).await else {
            return String::new();
        };
        redis::cmd(command[0])
            .arg(&command[1..])
            .query_async(&mut conn)
            .await
            .unwrap_or_default()
    }

    /// A replica whose link to its master is up.
    pub async fn in_sync(&self) -> bool {
        self.info(&["INFO", "replication"])
            .await
            .contains("master_link_status:up")
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on its port, with its arguments.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..100 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis node did not restart on port {}", self.port);
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn ping(url: &str) -> bool {
    match super::try_conn(url).await {
        Some(mut c) => redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok(),
        None => false,
    }
}
