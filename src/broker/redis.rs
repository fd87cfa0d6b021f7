//! The Redis broker: one RESP3 connection (a `ConnectionManager`) carries every
//! subscription, reconnects with capped backoff forever, and restores subscriptions by
//! itself. A health task PINGs it, which both detects half-open TCP and makes a pure
//! listener reconnect (the manager otherwise only reconnects when a command fails).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{
    BrokerError, BrokerEvent, JOIN_CHANNEL, SESSION_PATTERN, STANDBY_CHANNEL, SUBSCRIBING, Sink,
    SubscribeAck, chat_channel, end_channel,
};

/// Longest wait for one command, including a reconnect in progress (the crate's own
/// response timeout does not cover reconnects).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection is checked.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

enum Command {
    Subscribe(Uuid, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(Uuid),
}

pub struct RedisBroker {
    commands: mpsc::UnboundedSender<Command>,
    manager: ConnectionManager,
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
        info: ConnectionInfo,
        sink: Sink,
        standby: bool,
        tasks: &TaskTracker,
        token: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let connected = Arc::new(AtomicBool::new(false));
        let push_connected = connected.clone();
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(usize::MAX)
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // Every command here has its own timeout (COMMAND_TIMEOUT, the health
            // PING's): the crate's 500 ms default fails a PUBLISH that may still have
            // gone out (a retry sends it twice), and fails PINGs when the runtime is
            // merely busy.
            .set_response_timeout(None)
            .set_automatic_resubscription()
            .set_push_sender(move |push: PushInfo| {
                on_push(&sink, &push_connected, push);
                Ok::<(), std::convert::Infallible>(())
            });
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let (commands, rx) = mpsc::unbounded_channel();
        tasks.spawn(run_commands(
            manager.clone(),
            rx,
            connected.clone(),
            token.clone(),
        ));
        let listening = Arc::new(AtomicBool::new(false));
        tasks.spawn(listen_for_joins(
            manager.clone(),
            standby,
            listening.clone(),
            token.clone(),
        ));
        tasks.spawn(run_health(manager.clone(), connected.clone(), token));
        Ok(Self {
            commands,
            manager,
            connected,
            listening,
            tasks: tasks.clone(),
        })
    }

    pub fn record_end(&self, session: Uuid, payload: Bytes, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let mut conn = self.manager.clone();
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
        let mut conn = self.manager.clone();
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
        let mut conn = self.manager.clone();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(channel).arg(payload.as_ref());
        with_timeout(publish.query_async::<usize>(&mut conn)).await
    }

    pub async fn subscriber_counts(&self, channels: &[String]) -> Result<Vec<usize>, BrokerError> {
        let mut conn = self.manager.clone();
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB").arg(channels);
        let pairs: Vec<(String, usize)> = with_timeout(numsub.query_async(&mut conn)).await?;
        Ok(pairs.into_iter().map(|(_, n)| n).collect())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.listening.load(Ordering::Acquire)
    }
}

async fn with_timeout<T>(
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BrokerError::Command(e.to_string())),
        Err(_) => Err(BrokerError::Timeout(COMMAND_TIMEOUT)),
    }
}

fn on_push(sink: &Sink, connected: &AtomicBool, push: PushInfo) {
    match push.kind {
        PushKind::Message => {
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
        PushKind::Disconnection => {
            if connected.swap(false, Ordering::AcqRel) {
                tracing::warn!("redis connection lost; reconnecting");
            }
            sink(BrokerEvent::Disconnected);
        }
        _ => {}
    }
}

/// Most (un)subscribes sent in one command.
const BATCH: usize = 512;

/// Applies (un)subscribes in request order, a run of the same kind as one command.
/// Nothing waits behind Redis: while it is down a subscribe fails at once (the connect
/// gets a quick 503) and an unsubscribe is deferred, retried first thing later (before
/// anything requested after it) until it goes through, unless a later subscribe of the
/// same session supersedes it.
async fn run_commands(
    mut manager: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Command>,
    connected: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let mut deferred: Vec<Uuid> = Vec::new();
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch: Vec<Command> = Vec::new();
        tokio::select! {
            _ = token.cancelled() => break,
            command = rx.recv() => match command {
                Some(c) => batch.push(c),
                None => break,
            },
            _ = retry.tick(), if !deferred.is_empty() => {}
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut ops: Vec<Command> = deferred.drain(..).map(Command::Unsubscribe).collect();
        ops.extend(batch);
        while !ops.is_empty() {
            let subscribing = matches!(ops[0], Command::Subscribe(..));
            let len = ops
                .iter()
                .take_while(|c| matches!(c, Command::Subscribe(..)) == subscribing)
                .count();
            let run: Vec<Command> = ops.drain(..len).collect();
            let up = connected.load(Ordering::Acquire);
            if subscribing {
                let sessions: Vec<Uuid> = run.iter().map(Command::session).collect();
                deferred.retain(|s| !sessions.contains(s));
                let result = if up {
                    match with_timeout(announce(&mut manager, &sessions)).await {
                        Ok(()) => with_timeout(manager.subscribe(&channels(&sessions))).await,
                        Err(e) => Err(e),
                    }
                } else {
                    Err(BrokerError::Unavailable)
                };
                if let Err(e) = &result {
                    tracing::warn!(sessions = sessions.len(), error = %e, "subscribe failed");
                }
                for command in run {
                    if let Command::Subscribe(_, ack) = command {
                        let _ = ack.send(result.clone());
                    }
                }
            } else {
                let sessions: Vec<Uuid> = run.iter().map(Command::session).collect();
                let done = up
                    && with_timeout(manager.unsubscribe(&channels(&sessions)))
                        .await
                        .is_ok();
                if !done {
                    tracing::debug!(sessions = sessions.len(), "unsubscribe deferred");
                    deferred.extend(sessions);
                }
            }
        }
    }
    tracing::debug!("redis command task stopped");
}

/// Tells every instance, before subscribing, that this one is about to serve these
/// sessions: an instance that is stopping then waits for this one's join request
/// instead of taking the new subscription for one that already serves the session.
/// Sent on the subscribing connection, so Redis orders it before the subscription.
async fn announce(manager: &mut ConnectionManager, sessions: &[Uuid]) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for session in sessions {
        pipe.publish(JOIN_CHANNEL, format!("{session} {SUBSCRIBING}"))
            .ignore();
    }
    pipe.query_async(manager).await
}

impl Command {
    fn session(&self) -> Uuid {
        match self {
            Self::Subscribe(s, _) | Self::Unsubscribe(s) => *s,
        }
    }
}

/// Both channels of each session.
fn channels(sessions: &[Uuid]) -> Vec<String> {
    sessions
        .iter()
        .flat_map(|s| [chat_channel(*s), end_channel(*s)])
        .collect()
}

/// Subscribes to the join-request channel (and, for a history standby, to every
/// session's channel) once Redis is there; the manager restores the subscriptions
/// after every reconnect.
async fn listen_for_joins(
    mut manager: ConnectionManager,
    standby: bool,
    listening: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let channels: &[&str] = if standby {
        &[JOIN_CHANNEL, STANDBY_CHANNEL]
    } else {
        &[JOIN_CHANNEL]
    };
    let mut joins = false;
    loop {
        joins = joins || with_timeout(manager.subscribe(channels)).await.is_ok();
        if joins
            && (!standby
                || with_timeout(manager.psubscribe(SESSION_PATTERN))
                    .await
                    .is_ok())
        {
            listening.store(true, Ordering::Release);
            return;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
}

/// PINGs through the manager: marks the broker ready when Redis answers, and makes the
/// manager reconnect when it does not.
async fn run_health(
    mut manager: ConnectionManager,
    connected: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let mut interval = tokio::time::interval(HEALTH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ever_connected = false;
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = interval.tick() => {}
        }
        let ping = redis::cmd("PING");
        let ok = tokio::time::timeout(
            HEALTH_INTERVAL * 2,
            ping.query_async::<String>(&mut manager),
        )
        .map(|r| matches!(r, Ok(Ok(_))))
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
