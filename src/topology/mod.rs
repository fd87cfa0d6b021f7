//! Where Redis is and how to reach it: one server, a master watched by Sentinel, or a
//! Cluster. Every part that talks to Redis (the broker, the usage store, the shared
//! history) gets a [`Link`] from here, which reconnects by itself and, under Sentinel
//! or Cluster, follows a failover: the `redis` crate's `ConnectionManager` for one
//! server, its cluster connection (which tracks subscriptions and moves them after a
//! failover) for a Cluster, and for Sentinel a manager rebuilt on each new master
//! that the sentinels name (the crate has no manager over Sentinel).

mod cluster;
mod sentinel;
mod settings;

pub(crate) use settings::from_env;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisConnectionInfo, RedisFuture,
    RedisResult, Value,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The configured topology (`REDIS_*` variables).
#[derive(Clone, Debug)]
pub enum Topology {
    Single(ConnectionInfo),
    Sentinel(SentinelSettings),
    Cluster(ClusterSettings),
}

#[derive(Clone, Debug)]
pub struct SentinelSettings {
    /// The sentinels, with their own password if any.
    pub sentinels: Vec<ConnectionInfo>,
    /// The master's name in the sentinels' configuration.
    pub master: String,
    /// How to log in to the master (password, user).
    pub node: RedisConnectionInfo,
}

#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Any of the cluster's nodes; the rest is discovered.
    pub nodes: Vec<ConnectionInfo>,
    /// Sessions' channels use `SSUBSCRIBE`/`SPUBLISH`.
    pub sharded: bool,
}

impl Topology {
    /// For logs: where Redis is, without secrets.
    pub fn describe(&self) -> String {
        let list = |infos: &[ConnectionInfo]| {
            infos
                .iter()
                .map(|i| i.addr().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Self::Single(info) => info.addr().to_string(),
            Self::Sentinel(s) => format!("sentinel {} via {}", s.master, list(&s.sentinels)),
            Self::Cluster(c) => format!(
                "cluster {}{}",
                list(&c.nodes),
                if c.sharded { " (sharded pub/sub)" } else { "" }
            ),
        }
    }

    pub fn sharded(&self) -> bool {
        matches!(self, Self::Cluster(c) if c.sharded)
    }
}

/// What a part's link receives besides replies: pub/sub messages and disconnections.
pub type PushHandler = Arc<dyn Fn(PushInfo) + Send + Sync>;

/// How a part wants its link.
#[derive(Clone)]
pub struct LinkOptions {
    /// RESP3 pushes (the broker); a link with a handler restores its subscriptions
    /// after every reconnect.
    pub push: Option<PushHandler>,
    /// The crate's wait for one reply; `None` leaves the timeouts to the caller.
    pub response_timeout: Option<Duration>,
}

/// How long a (re)connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// The process's way to Redis, shared by every part.
pub struct Redis {
    topology: Topology,
    /// Under Sentinel, the master the sentinels name (`None` until one answers).
    master: Option<watch::Receiver<Option<ConnectionInfo>>>,
    /// On a Cluster, its slot map (`None` until a node answers).
    slots: Option<watch::Receiver<Option<cluster::SlotMap>>>,
}

impl Redis {
    /// Under Sentinel, starts asking the sentinels for the master, and on a Cluster
    /// the cluster for its slot map, for as long as `token` lives.
    pub fn start(topology: Topology, tasks: &TaskTracker, token: CancellationToken) -> Self {
        let (mut master, mut slots) = (None, None);
        match &topology {
            Topology::Sentinel(settings) => {
                let (tx, rx) = watch::channel(None);
                tasks.spawn(sentinel::watch_master(settings.clone(), tx, token));
                master = Some(rx);
            }
            Topology::Cluster(settings) => {
                let (tx, rx) = watch::channel(None);
                tasks.spawn(cluster::watch_slots(settings.nodes.clone(), tx, token));
                slots = Some(rx);
            }
            Topology::Single(_) => {}
        }
        Self {
            topology,
            master,
            slots,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A new link; it connects in the background (the server starts while Redis is
    /// still coming up) and never gives up reconnecting.
    pub fn link(&self, options: LinkOptions, tasks: &TaskTracker) -> RedisResult<Link> {
        match &self.topology {
            Topology::Single(info) => {
                let client = redis::Client::open(with_protocol(info.clone(), &options))?;
                Ok(Link::Single(manager(client, &options)?))
            }
            Topology::Sentinel(settings) => {
                let master = self.master.clone().expect("a sentinel watch");
                Ok(Link::Sentinel(sentinel::Follower::start(
                    settings.node.clone(),
                    master,
                    options,
                    tasks,
                )))
            }
            Topology::Cluster(settings) => {
                let nodes: Vec<ConnectionInfo> = settings
                    .nodes
                    .iter()
                    .map(|n| with_protocol(n.clone(), &options))
                    .collect();
                let mut builder = ClusterClientBuilder::new(nodes)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .max_retry_wait(MAX_RECONNECT_DELAY.as_millis() as u64)
                    .response_timeout(options.response_timeout.unwrap_or(Duration::from_secs(5)));
                if options.push.is_some() {
                    builder = builder.use_protocol(ProtocolVersion::RESP3);
                }
                if let Some(push) = options.push.clone() {
                    builder = builder.push_sender(move |info: PushInfo| {
                        push(info);
                        Ok::<(), std::convert::Infallible>(())
                    });
                }
                let client = builder.build()?;
                let conn = client.get_pending_async_connection_with_config(
                    ClusterConfig::new().set_connection_timeout(CONNECT_TIMEOUT),
                );
                let mut slots = self.slots.clone().expect("a slot map watch");
                tasks.spawn({
                    let conn = conn.clone();
                    let mut slots = slots.clone();
                    async move {
                        let mut before = slots.borrow_and_update().clone();
                        while slots.changed().await.is_ok() {
                            let after = slots.borrow_and_update().clone();
                            if let (Some(b), Some(a)) = (&before, &after) {
                                cluster::nudge(&conn, b, a).await;
                            }
                            before = after;
                        }
                    }
                });
                slots.mark_unchanged();
                let node = settings
                    .nodes
                    .first()
                    .map(|n| n.redis_settings().clone())
                    .unwrap_or_default();
                Ok(Link::Cluster(
                    conn,
                    slots,
                    Arc::new(cluster::Pinger::new(node)),
                ))
            }
        }
    }
}

fn with_protocol(info: ConnectionInfo, options: &LinkOptions) -> ConnectionInfo {
    if options.push.is_none() {
        return info;
    }
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    info.set_redis_settings(settings)
}

/// A manager that retries forever, and with a push handler restores its
/// subscriptions after each reconnect.
fn manager(client: redis::Client, options: &LinkOptions) -> RedisResult<ConnectionManager> {
    let mut config = ConnectionManagerConfig::new()
        .set_number_of_retries(usize::MAX)
        .set_max_delay(MAX_RECONNECT_DELAY)
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(options.response_timeout);
    if let Some(push) = options.push.clone() {
        config = config
            .set_automatic_resubscription()
            .set_push_sender(move |info: PushInfo| {
                push(info);
                Ok::<(), std::convert::Infallible>(())
            });
    }
    ConnectionManager::new_lazy_with_config(client, config)
}

/// On one server, sharded channels are plain ones.
async fn subscribe(m: &mut ConnectionManager, kind: Kind, channels: &[String]) -> RedisResult<()> {
    match kind {
        Kind::Pattern => m.psubscribe(channels).await,
        _ => m.subscribe(channels).await,
    }
}

async fn unsubscribe(
    m: &mut ConnectionManager,
    kind: Kind,
    channels: &[String],
) -> RedisResult<()> {
    match kind {
        Kind::Pattern => m.punsubscribe(channels).await,
        _ => m.unsubscribe(channels).await,
    }
}

/// A connection to the configured Redis: cheap to clone, usable as any of the
/// crate's async connections (`query_async`).
#[derive(Clone)]
pub enum Link {
    Single(ConnectionManager),
    Sentinel(Arc<sentinel::Follower>),
    /// With the cluster's slot map, as last read, and what checks its masters.
    Cluster(
        ClusterConnection,
        watch::Receiver<Option<cluster::SlotMap>>,
        Arc<cluster::Pinger>,
    ),
}

/// What kind of subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Channel,
    Pattern,
    /// Sharded (`SSUBSCRIBE`): only on a Cluster.
    Shard,
}

impl Link {
    pub async fn subscribe(&mut self, kind: Kind, channels: &[String]) -> RedisResult<()> {
        match self {
            Self::Single(m) => subscribe(m, kind, channels).await,
            Self::Sentinel(f) => f.subscribe(kind, channels).await,
            Self::Cluster(c, ..) => cluster::each_channel(c, kind, channels, true).await,
        }
    }

    pub async fn unsubscribe(&mut self, kind: Kind, channels: &[String]) -> RedisResult<()> {
        match self {
            Self::Single(m) => unsubscribe(m, kind, channels).await,
            Self::Sentinel(f) => f.unsubscribe(kind, channels).await,
            Self::Cluster(c, ..) => cluster::each_channel(c, kind, channels, false).await,
        }
    }

    /// Whether the master answers; on a Cluster, every master of the slot map (a
    /// master that died is in it until its replica has taken over).
    pub async fn ping(&mut self) -> RedisResult<()> {
        if let Self::Cluster(_, slots, pinger) = self {
            let map = slots.borrow().clone();
            return match map {
                Some(map) => pinger.ping_masters(&map).await,
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "no cluster node has answered yet",
                )
                .into()),
            };
        }
        redis::cmd("PING")
            .query_async::<Value>(self)
            .await
            .map(drop)
    }

    /// Whether commands for different sessions must go separately (different slots).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(..))
    }

    /// Runs each pipeline on its own (on a Cluster, one pipeline may only touch one
    /// slot; elsewhere the connection still writes them out together), all at once.
    pub async fn each<T: redis::FromRedisValue>(&self, pipes: &[Pipeline]) -> RedisResult<Vec<T>> {
        futures::future::try_join_all(pipes.iter().map(|pipe| {
            let mut conn = self.clone();
            async move { pipe.query_async::<T>(&mut conn).await }
        }))
        .await
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(m) => m.req_packed_command(cmd),
            Self::Cluster(c, ..) => c.req_packed_command(cmd),
            Self::Sentinel(f) => {
                let current = f.current();
                Box::pin(async move { current?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(m) => m.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c, ..) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(f) => {
                let current = f.current();
                let run: BoxFuture<'a, RedisResult<Vec<Value>>> =
                    Box::pin(
                        async move { current?.req_packed_commands(pipeline, offset, count).await },
                    );
                run
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(m) => m.get_db(),
            Self::Cluster(c, ..) => c.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}

/// `fut`, or a time-out error after `limit`: the crate's own response timeout does not
/// cover a reconnect in progress.
pub async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("redis did not answer within {limit:?}"),
        )
        .into()),
    }
}
