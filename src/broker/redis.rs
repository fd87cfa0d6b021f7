//! The Redis broker: one RESP3 link (`topology`) carries every subscription,
//! reconnects with capped backoff forever, and restores subscriptions by itself, on a
//! new master too. A health task PINGs it (every master, on a Cluster), which both
//! detects half-open TCP and makes a pure listener reconnect (the link otherwise only
//! reconnects when a command fails).
//!
//! With sharded pub/sub (a Cluster, `REDIS_SHARDED_PUBSUB`), a session's channels and
//! its join channel are sharded channels in one slot, so a message and a join
//! request travel over the same connection, in order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::subscriptions::{self, Command};
use super::{BrokerError, BrokerEvent, JOIN_CHANNEL, Sink, SubscribeAck, sharded_join_channel};
use crate::topology::{Link, LinkOptions, Redis, Topology};

/// Longest wait for one command, including a reconnect in progress (the crate's own
/// response timeout does not cover reconnects).
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection is checked.
pub(super) const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// How long the health PING may go unanswered before Redis counts as gone. Long on
/// purpose: a lost connection is known at once (the crate reports the disconnection,
/// and the PING fails), while a late reply is more often this process being busy (a
/// big fan-out delays every task, the one reading Redis's replies included) than
/// Redis hanging. Readiness must not flap off exactly when an instance is busiest.
const PING_PATIENCE: Duration = Duration::from_secs(10);

pub struct RedisBroker {
    commands: mpsc::UnboundedSender<Command>,
    link: Link,
    /// Sessions' channels are sharded channels.
    sharded: bool,
    connected: Arc<AtomicBool>,
    /// Subscribed to the join-request channel: sessions can be joined to the shared
    /// history (this instance hears its own requests).
    listening: Arc<AtomicBool>,
    /// Runs the fire-and-forget writes (ended sessions), tracked for shutdown.
    tasks: TaskTracker,
}

/// Where an ended session's end payload is kept for the other instances; the hash tag
/// keeps it in the session's slot on a cluster.
fn ended_key(session: Uuid) -> String {
    format!("chat-sync:ended:{{{session}}}")
}

impl RedisBroker {
    pub fn start(
        redis: &Redis,
        sink: Sink,
        standby: bool,
        tasks: &TaskTracker,
        token: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let connected = Arc::new(AtomicBool::new(false));
        let sharded = redis.topology().sharded();
        // On a Cluster a lost node costs only the sessions subscribed there: a gap is
        // noted per channel, where its subscription is restored. Elsewhere one
        // connection carries everything, and losing it is a gap for every session.
        let restored = matches!(redis.topology(), Topology::Cluster(_))
            .then(|| Arc::new(Mutex::new(HashSet::new())));
        let push = {
            let connected = connected.clone();
            Arc::new(move |push: PushInfo| on_push(&sink, &connected, restored.as_deref(), push))
        };
        // Every command here has its own timeout (COMMAND_TIMEOUT, the health PING's):
        // the crate's 500 ms default fails a PUBLISH that may still have gone out (a
        // retry sends it twice), and fails PINGs when the runtime is merely busy.
        let link = redis
            .link(
                LinkOptions {
                    push: Some(push),
                    response_timeout: None,
                },
                tasks,
            )
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let (commands, rx) = mpsc::unbounded_channel();
        tasks.spawn(subscriptions::run_commands(
            link.clone(),
            sharded,
            rx,
            connected.clone(),
            token.clone(),
        ));
        let listening = Arc::new(AtomicBool::new(false));
        tasks.spawn(subscriptions::listen_for_joins(
            link.clone(),
            standby,
            listening.clone(),
            token.clone(),
        ));
        tasks.spawn(run_health(link.clone(), connected.clone(), token));
        Ok(Self {
            commands,
            link,
            sharded,
            connected,
            listening,
            tasks: tasks.clone(),
        })
    }

    pub fn record_end(&self, session: Uuid, payload: Bytes, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let mut conn = self.link.clone();
        self.tasks.spawn(async move {
            let mut set = redis::cmd("SET");
            set.arg(ended_key(session))
                .arg(payload.as_ref())
                .arg("PX")
                .arg(ttl.as_millis() as u64);
            if let Err(e) = with_timeout(set.query_async::<()>(&mut conn)).await {
                tracing::warn!(%session, error = %e, "could not record the end for other instances");
            }
        });
    }

    pub async fn ended(&self, session: Uuid) -> Result<Option<Bytes>, BrokerError> {
        if !self.is_connected() {
            return Err(BrokerError::Unavailable);
        }
        let mut conn = self.link.clone();
        let mut get = redis::cmd("GET");
        get.arg(ended_key(session));
        let value: Option<Vec<u8>> = with_timeout(get.query_async(&mut conn)).await?;
        Ok(value.map(Bytes::from))
    }

    pub fn subscribe(&self, session: Uuid) -> SubscribeAck {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Subscribe(session, tx));
        async move { rx.await.unwrap_or(Err(BrokerError::Unavailable)) }
            .boxed()
            .shared()
    }

    pub fn unsubscribe(&self, session: Uuid) {
        let _ = self.commands.send(Command::Unsubscribe(session));
    }

    pub async fn publish(&self, channel: String, payload: Bytes) -> Result<usize, BrokerError> {
        if !self.is_connected() {
            return Err(BrokerError::Unavailable);
        }
        let mut conn = self.link.clone();
        let mut publish = redis::cmd(if self.sharded && !is_ours(&channel) {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        publish.arg(channel).arg(payload.as_ref());
        with_timeout(publish.query_async::<usize>(&mut conn)).await
    }

    /// Subscribers per channel, from every node of a Cluster (the crate adds them up).
    pub async fn subscriber_counts(&self, channels: &[String]) -> Result<Vec<usize>, BrokerError> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let (ours, sessions): (Vec<&String>, Vec<&String>) =
            channels.iter().partition(|c| is_ours(c));
        for (list, sharded) in [(ours, false), (sessions, self.sharded)] {
            if list.is_empty() {
                continue;
            }
            let mut conn = self.link.clone();
            let mut numsub = redis::cmd("PUBSUB");
            numsub
                .arg(if sharded { "SHARDNUMSUB" } else { "NUMSUB" })
                .arg(list);
            let found: HashMap<String, usize> = with_timeout(numsub.query_async(&mut conn)).await?;
            counts.extend(found);
        }
        Ok(channels
            .iter()
            .map(|c| counts.get(c).copied().unwrap_or(0))
            .collect())
    }

    /// Where join requests for `session` are published.
    pub fn join_channel(&self, session: Uuid) -> String {
        if self.sharded {
            sharded_join_channel(session)
        } else {
            JOIN_CHANNEL.into()
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.listening.load(Ordering::Acquire)
    }
}

pub(super) async fn with_timeout<T>(
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BrokerError::Command(e.to_string())),
        Err(_) => Err(BrokerError::Timeout(COMMAND_TIMEOUT)),
    }
}

/// chat-sync's own channels, which are never sharded.
fn is_ours(channel: &str) -> bool {
    channel.starts_with("chat-sync:history:")
}

/// `restored`: on a Cluster, the channels whose subscription was confirmed; a second
/// confirmation of one is its subscription restored after a lost node or a moved
/// slot, and what was published in between is lost to it.
fn on_push(
    sink: &Sink,
    connected: &AtomicBool,
    restored: Option<&Mutex<HashSet<Vec<u8>>>>,
    push: PushInfo,
) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            let mut data = push.data.into_iter();
            if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                (data.next(), data.next())
            {
                sink(BrokerEvent::Message {
                    channel: &channel,
                    payload: Bytes::from(payload),
                });
            }
        }
        PushKind::PMessage => {
            let mut data = push.data.into_iter().skip(1);
            if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                (data.next(), data.next())
            {
                sink(BrokerEvent::Pattern {
                    channel: &channel,
                    payload: Bytes::from(payload),
                });
            }
        }
        PushKind::Subscribe | PushKind::SSubscribe | PushKind::PSubscribe => {
            if let (Some(restored), Some(Value::BulkString(channel))) =
                (restored, push.data.first())
                && !restored.lock().unwrap().insert(channel.clone())
            {
                sink(BrokerEvent::Restored { channel });
            }
        }
        PushKind::Unsubscribe | PushKind::SUnsubscribe | PushKind::PUnsubscribe => {
            if let (Some(restored), Some(Value::BulkString(channel))) =
                (restored, push.data.first())
            {
                restored.lock().unwrap().remove(channel);
            }
        }
        PushKind::Disconnection => {
            if connected.swap(false, Ordering::AcqRel) {
                tracing::warn!("redis connection lost; reconnecting");
            }
            if restored.is_none() {
                sink(BrokerEvent::Disconnected);
            }
        }
        _ => {}
    }
}

/// PINGs through the link: marks the broker ready when Redis (every master of a
/// Cluster) answers, and makes the link reconnect when it does not.
async fn run_health(mut link: Link, connected: Arc<AtomicBool>, token: CancellationToken) {
    let mut interval = tokio::time::interval(HEALTH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ever_connected = false;
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = interval.tick() => {}
        }
        let ok = tokio::time::timeout(PING_PATIENCE, link.ping())
            .map(|r| matches!(r, Ok(Ok(()))))
            .await;
        let was = connected.swap(ok, Ordering::AcqRel);
        if ok && !was {
            if ever_connected {
                tracing::info!("redis connection restored");
            } else {
                tracing::info!("redis connected");
            }
            ever_connected = true;
        } else if !ok && was {
            tracing::warn!("redis does not answer PING");
        }
    }
    tracing::debug!("redis health task stopped");
}
