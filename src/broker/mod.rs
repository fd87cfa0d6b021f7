//! The broker: where chat messages come from. One Redis pub/sub connection for all
//! sessions, or an in-process broker when no Redis is configured (single instance).
//!
//! The broker knows channels, not sessions: it hands every event to a [`Sink`] given at
//! start-up, synchronously and without blocking, and takes (un)subscribe requests in
//! the order they were made, so a session freed and re-created at once never ends up
//! unsubscribed while it has viewers.

mod memory;
mod redis;
mod subscriptions;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Suffix of the channel on which the tenant announces the end of a session.
pub const END_SUFFIX: &str = "_END";

/// chat-sync's own channel, which every instance listens to: an instance starting to
/// serve a session publishes a join request there (`history`).
pub const JOIN_CHANNEL: &str = "chat-sync:history:join";

/// On [`JOIN_CHANNEL`], `<session> +`: an instance is about to subscribe to the
/// session (its join request follows once it has).
pub const SUBSCRIBING: &str = "+";

/// Every session's chat channel (a UUID) and nothing else (not `_END`, not ours).
pub const SESSION_PATTERN: &str = "????????-????-????-????-????????????";

/// Nothing is published here: each history standby subscribes, so that `PUBSUB
/// NUMSUB` counts them (`NUMPAT` counts distinct patterns, not subscribers).
pub const STANDBY_CHANNEL: &str = "chat-sync:history:standby";

/// What the broker reports to the rest of the server.
#[derive(Debug)]
pub enum BrokerEvent<'a> {
    /// A payload published on `channel`.
    Message { channel: &'a [u8], payload: Bytes },
    /// A payload published on `channel`, received through the history standby's
    /// pattern subscription (every session's chat channel).
    Pattern { channel: &'a [u8], payload: Bytes },
    /// The Redis connection was lost; whatever is published until it is back is lost.
    Disconnected,
    /// On a Cluster, this channel's (or pattern's) subscription was restored after
    /// its node was lost or its slot moved: what was published on it in between is
    /// lost.
    Restored { channel: &'a [u8] },
}

/// Receives broker events on the connection's own task: it must not block or await.
pub type Sink = Arc<dyn Fn(BrokerEvent<'_>) + Send + Sync>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker is not connected")]
    Unavailable,
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the command: {0}")]
    Command(String),
}

/// Resolves once a subscription is confirmed; cloneable so every concurrent first
/// connect to a session waits on the same single SUBSCRIBE.
pub type SubscribeAck = Shared<BoxFuture<'static, Result<(), BrokerError>>>;

/// The channel carrying a session's chat messages (the original's naming).
pub fn chat_channel(session: Uuid) -> String {
    session.hyphenated().to_string()
}

/// With sharded pub/sub, where join requests for `session` go: a sharded channel in
/// the slot of the session's own channels (the hash tag is the session channel's
/// name), so that a request arrives in order with the session's messages.
pub fn sharded_join_channel(session: Uuid) -> String {
    format!("chat-sync:join:{{{}}}", session.hyphenated())
}

/// Whether `channel` carries join requests (the shared one, or a session's own).
pub fn is_join_channel(channel: &[u8]) -> bool {
    channel == JOIN_CHANNEL.as_bytes()
        || (channel.starts_with(b"chat-sync:join:{") && channel.ends_with(b"}"))
}

/// The channel announcing a session's end.
pub fn end_channel(session: Uuid) -> String {
    format!("{}{END_SUFFIX}", session.hyphenated())
}

/// A cheap-to-clone handle on the configured broker.
#[derive(Clone)]
pub enum Broker {
    Memory(Arc<memory::MemoryBroker>),
    Redis(Arc<redis::RedisBroker>),
}

impl Broker {
    /// The in-process broker: publishes go straight to the sink.
    pub fn memory(sink: Sink) -> Self {
        Self::Memory(Arc::new(memory::MemoryBroker::new(sink)))
    }

    /// A Redis broker; it connects in the background, so the server starts (not ready)
    /// even while Redis is still coming up.
    pub fn redis(
        redis: &crate::topology::Redis,
        sink: Sink,
        standby: bool,
        tasks: &TaskTracker,
        token: CancellationToken,
    ) -> Result<Self, BrokerError> {
        redis::RedisBroker::start(redis, sink, standby, tasks, token)
            .map(|b| Self::Redis(Arc::new(b)))
    }

    /// Subscribes to the session's chat and end channels. Must not block: callers hold
    /// the session table's lock so that (un)subscribes are queued in table order.
    pub fn subscribe(&self, session: Uuid) -> SubscribeAck {
        match self {
            Self::Memory(b) => {
                b.subscribe(session);
                futures::future::ready(Ok(())).boxed().shared()
            }
            Self::Redis(b) => b.subscribe(session),
        }
    }

    /// Drops the session's subscriptions. Must not block, as [`Broker::subscribe`].
    pub fn unsubscribe(&self, session: Uuid) {
        match self {
            Self::Memory(b) => b.unsubscribe(session),
            Self::Redis(b) => b.unsubscribe(session),
        }
    }

    /// Tells every instance that the session ended: connects to it on an instance
    /// that was not watching it get `204` too, for `ttl`, without subscribing. Does
    /// not block; the in-process broker has no other instance to tell.
    pub fn record_end(&self, session: Uuid, payload: Bytes, ttl: Duration) {
        if let Self::Redis(b) = self {
            b.record_end(session, payload, ttl);
        }
    }

    /// The end payload of a session that another instance saw end, if it did within
    /// its ended-session TTL.
    pub async fn ended(&self, session: Uuid) -> Result<Option<Bytes>, BrokerError> {
        match self {
            Self::Memory(_) => Ok(None),
            Self::Redis(b) => b.ended(session).await,
        }
    }

    /// Publishes a payload; returns how many subscribers (instances) received it.
    pub async fn publish(&self, channel: String, payload: Bytes) -> Result<usize, BrokerError> {
        match self {
            Self::Memory(b) => Ok(b.publish(&channel, payload)),
            Self::Redis(b) => b.publish(channel, payload).await,
        }
    }

    /// How many subscribers (instances) each channel has; with the in-process broker
    /// there is only this one.
    pub async fn subscriber_counts(&self, channels: &[String]) -> Result<Vec<usize>, BrokerError> {
        match self {
            Self::Memory(_) => Ok(vec![1; channels.len()]),
            Self::Redis(b) => b.subscriber_counts(channels).await,
        }
    }

    /// Where join requests for `session` are published.
    pub fn join_channel(&self, session: Uuid) -> String {
        match self {
            Self::Memory(_) => JOIN_CHANNEL.into(),
            Self::Redis(b) => b.join_channel(session),
        }
    }

    /// Whether messages can flow right now (readiness).
    pub fn is_connected(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(b) => b.is_connected(),
        }
    }

    /// A short name for logs and `/readyz`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}
