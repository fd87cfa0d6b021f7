//! The session registry: admits subscribers (limits, ended sessions, resume position),
//! creates sessions and subscribes them on first use, and frees them when they end or
//! have been unwatched for the grace period.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::broker::{Broker, BrokerError};
use crate::class::{Asked, Classes};
use crate::client::ClientLimits;
use crate::frame;
use crate::history::History;
pub use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::position::Position;
use crate::replay::{ReplayBuffer, Resume};
use crate::session::{Session, Sessions, Signal};
use crate::subscription::{CATCH_UP_BYTES, Full, Slots, SubscriberGuard, Subscription};
use crate::viewer::Viewers;

/// Why a subscriber was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The session ended recently; `204` tells EventSource to stop reconnecting.
    #[error("the session has ended")]
    Ended,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("this instance has reached its connection limit")]
    TooManyConnections,
    #[error("this session has reached its connection limit")]
    TooManySessionConnections,
    #[error("this session has reached its limit of delivery classes (interval_ms, max_batch)")]
    TooManyClasses,
    #[error("this instance has reached its session limit")]
    TooManySessions,
    #[error("this client has reached its limit of open streams")]
    TooManyClientStreams,
    #[error("this client opens new sessions too fast")]
    TooManyNewSessions,
    #[error("could not subscribe to the session: {0}")]
    Broker(#[from] BrokerError),
}

pub struct Registry {
    pub sessions: Arc<Sessions>,
    /// Recently ended sessions and when they ended; connects to them get `204`.
    ended: DashMap<Uuid, Instant>,
    broker: Broker,
    history: Arc<History>,
    limits: Limits,
    /// Random per process start; names this process to the other instances.
    pub boot: u64,
    /// Open streams, instance-wide and per client.
    slots: Arc<Slots>,
    /// Kept apart from the map so it can be checked while a map shard is locked.
    session_count: AtomicUsize,
    closing: AtomicBool,
    pub metrics: Arc<Metrics>,
}

/// How long a resume from a position not known here waits for it before the shared
/// history is asked whether it exists.
const RESUME_GRACE: Duration = Duration::from_millis(250);

enum Admitted {
    /// The prelude, and the signals from the frame with this sequence number on.
    Now(Bytes, broadcast::Receiver<Signal>, u64),
    Later(broadcast::Receiver<Signal>),
    Refused(AttachError),
}

/// The least a session keeps of recent frames, whatever `REPLAY_BYTES` says: a viewer
/// that is one ordinary tick behind must still find its frame.
const MIN_LIVE_BYTES: usize = 256 * 1024;

impl Registry {
    pub fn new(
        sessions: Arc<Sessions>,
        broker: Broker,
        history: Arc<History>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            sessions,
            ended: DashMap::new(),
            broker,
            history,
            boot: rand_u64(),
            slots: Arc::new(Slots::new(
                ClientLimits::new(
                    limits.max_streams_per_client,
                    limits.new_sessions_per_client,
                ),
                metrics.clone(),
            )),
            session_count: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            limits,
            metrics,
        }
    }

    pub fn session_count(&self) -> usize {
        self.session_count.load(Ordering::Acquire)
    }

    pub fn connection_count(&self) -> usize {
        self.slots.connections.load(Ordering::Acquire)
    }

    /// Whether the session ended within the ended-session TTL.
    pub fn has_ended(&self, id: Uuid) -> bool {
        self.ended
            .get(&id)
            .is_some_and(|at| at.elapsed() < self.limits.ended_ttl)
    }

    /// Admits a subscriber from `client` to `id`, resuming after `last_event_id`, to
    /// be sent the session as it `asked`.
    pub async fn attach(
        self: &Arc<Self>,
        id: Uuid,
        last_event_id: Option<&str>,
        client: IpAddr,
        asked: Asked,
    ) -> Result<Subscription, AttachError> {
        self.metrics.connects.inc();
        let result = self.try_attach(id, last_event_id, client, asked).await;
        if let Err(e) = &result {
            self.metrics.reject_connection(match e {
                AttachError::Ended => "ended",
                AttachError::ShuttingDown => "shutting_down",
                AttachError::TooManyConnections => "max_connections",
                AttachError::TooManySessionConnections => "max_connections_per_session",
                AttachError::TooManyClasses => "max_classes_per_session",
                AttachError::TooManySessions => "max_sessions",
                AttachError::TooManyClientStreams => "max_streams_per_client",
                AttachError::TooManyNewSessions => "new_sessions_per_client",
                AttachError::Broker(_) => "broker",
            });
        }
        result
    }

    async fn try_attach(
        self: &Arc<Self>,
        id: Uuid,
        last_event_id: Option<&str>,
        client: IpAddr,
        asked: Asked,
    ) -> Result<Subscription, AttachError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(AttachError::ShuttingDown);
        }
        if self.has_ended(id) {
            return Err(AttachError::Ended);
        }
        if !self.sessions.map.contains_key(&id) {
            // Subscribing needs the broker: say so at once rather than wait for it.
            if !self.broker.is_connected() {
                return Err(AttachError::Broker(BrokerError::Unavailable));
            }
            // It may have ended on another instance: answer as that one would,
            // without subscribing to a dead session.
            if matches!(self.broker.ended(id).await, Ok(Some(_))) {
                return Err(AttachError::Ended);
            }
        }
        self.slots
            .open(self.limits.max_connections, client)
            .map_err(|full| match full {
                Full::Instance => AttachError::TooManyConnections,
                Full::Client => AttachError::TooManyClientStreams,
            })?;
        let session = match self.join_session(id, client) {
            Ok(session) => session,
            Err(e) => {
                self.slots.release(client);
                return Err(e);
            }
        };
        // From here the guard undoes the membership on every early return.
        let guard = SubscriberGuard::new(self.slots.clone(), session.clone(), client);
        let subscribing = session.subscribed.peek().is_none();
        if let Err(e) = session.subscribed.clone().await {
            self.forget_if_unwatched(&session);
            return Err(e.into());
        }
        if subscribing {
            // The end may have been published between the check above and the
            // subscription: then it is delivered as if it had arrived here.
            if let Ok(Some(end)) = self.broker.ended(id).await {
                session.inbox.lock().unwrap().end.get_or_insert(end);
                self.sessions.touch(&session);
            }
        }
        // Every viewer waits for the session to join the shared history, which the
        // first one to get here does (another takes over if it goes away meanwhile).
        session
            .joined
            .get_or_init(|| self.history.join(&session, &self.broker))
            .await;
        let position = last_event_id.map(Position::parse);
        // A position not captured here yet may come from an instance a tick ahead:
        // wait for the next frames a little, then as long as the shared history says
        // the message exists. A made-up or forgotten one gets `reset` after the grace.
        let start = Instant::now();
        let mut until = start + RESUME_GRACE;
        let mut looked_up = false;
        loop {
            let may_wait = !looked_up || Instant::now() < until;
            let mut signals = match self.admit(&session, position, may_wait, asked) {
                Admitted::Now(prelude, signals, next) => {
                    return Ok(Subscription::new(
                        prelude,
                        signals,
                        guard,
                        next,
                        asked.class,
                    ));
                }
                Admitted::Refused(e) => return Err(e),
                Admitted::Later(signals) => signals,
            };
            if !looked_up && Instant::now() >= until {
                looked_up = true;
                let known = match position {
                    Some(Some(p)) => self.history.knows(id, p.after).await,
                    _ => false,
                };
                if !known {
                    continue;
                }
                until = start + self.history.handover_wait;
            }
            let next_frame = async { while let Ok(Signal::Heartbeat) = signals.recv().await {} };
            let _ = tokio::time::timeout_at(until.into(), next_frame).await;
        }
    }

    /// The new subscriber's prelude (`retry:`, then what it missed or a `reset`, or
    /// on a fresh connect the recent messages it `asked` for) and its place in the
    /// session's signals, under the outbox lock so that no frame falls between the
    /// two; or, if its position is unknown here and `may_wait`, the signals to wait on
    /// for it.
    fn admit(
        &self,
        session: &Session,
        position: Option<Option<Position>>,
        may_wait: bool,
        asked: Asked,
    ) -> Admitted {
        let outbox = session.outbox.lock().unwrap();
        if outbox.closed {
            return Admitted::Refused(if self.closing.load(Ordering::Acquire) {
                AttachError::ShuttingDown
            } else {
                AttachError::Ended
            });
        }
        if !outbox.classes.admits(asked.class) {
            return Admitted::Refused(AttachError::TooManyClasses);
        }
        let mut prelude = BytesMut::from(&frame::retry(self.limits.client_retry)[..]);
        let mut next = outbox.replay.head() + 1;
        // What it missed, beyond a catch-up's bytes, is its task's to send (read from
        // the replay buffer).
        let missed = |p| outbox.replay.since(p, CATCH_UP_BYTES);
        match position.map(|p| p.map(missed)) {
            None => {
                // One event, so no more than the viewer's batches hold.
                let history = asked
                    .class
                    .keep()
                    .map_or(asked.history, |k| k.min(asked.history));
                if let Some(recent) = (history > 0)
                    .then(|| outbox.replay.recent(history))
                    .flatten()
                {
                    prelude.extend_from_slice(&recent);
                }
            }
            Some(Some(Resume::Frames { first, frames })) => {
                // Merged as its class has it.
                next = first + frames.len() as u64;
                let merged = frame::merge(&frames, asked.class.keep(), true);
                self.metrics.messages_skipped.inc_by(merged.skipped as u64);
                prelude.extend_from_slice(&merged.bytes);
            }
            Some(Some(Resume::Lost)) if may_wait => {
                return Admitted::Later(outbox.tx.subscribe());
            }
            Some(_) => {
                let last = outbox.replay.last_message();
                let head = (last != 0).then_some(Position::after(last));
                prelude.extend_from_slice(&frame::reset(head, "history not available"))
            }
        }
        Admitted::Now(prelude.freeze(), outbox.tx.subscribe(), next)
    }

    /// Finds or creates the session and counts the caller in, under the map's lock so
    /// that the reaper cannot free the session in between and concurrent first
    /// connects subscribe exactly once.
    fn join_session(&self, id: Uuid, client: IpAddr) -> Result<Arc<Session>, AttachError> {
        let session = match self.sessions.map.entry(id) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => {
                if self.session_count.load(Ordering::Acquire) >= self.limits.max_sessions {
                    return Err(AttachError::TooManySessions);
                }
                if !self.slots.clients.create_session(client, Instant::now()) {
                    return Err(AttachError::TooManyNewSessions);
                }
                self.session_count.fetch_add(1, Ordering::AcqRel);
                self.metrics.sessions.inc();
                let session = Arc::new(Session::new(
                    id,
                    self.broker.subscribe(id),
                    self.limits.subscriber_buffer,
                    ReplayBuffer::new(
                        // Live subscribers read their frames from it too: it holds at
                        // least the frames one may lag behind.
                        self.limits
                            .replay_batches
                            .max(self.limits.subscriber_buffer),
                        self.limits.replay_bytes.max(MIN_LIVE_BYTES),
                        self.metrics.replay_bytes.clone(),
                    ),
                    Viewers::new(self.metrics.gzip.clone()),
                    Classes::new(
                        self.metrics.gzip.clone(),
                        self.metrics.messages_skipped.clone(),
                    ),
                ));
                e.insert(session.clone());
                session
            }
        };
        let before = session.subscribers.fetch_add(1, Ordering::AcqRel);
        if before >= self.limits.max_connections_per_session {
            if session.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
                *session.idle_since.lock().unwrap() = Some(Instant::now());
            }
            return Err(AttachError::TooManySessionConnections);
        }
        Ok(session)
    }

    /// Removes `session` from the map if it is still the registered one and `unwatched`
    /// holds, and unsubscribes it. The unsubscribe is queued while the map entry is
    /// locked, so it is ordered before any later subscribe of the same id.
    fn remove(&self, session: &Arc<Session>, unwatched: bool) -> bool {
        let removed = self
            .sessions
            .map
            .remove_if(&session.id, |_, current| {
                let remove = Arc::ptr_eq(current, session)
                    && (!unwatched || current.subscribers.load(Ordering::Acquire) == 0);
                if remove {
                    self.broker.unsubscribe(session.id);
                    session.free();
                }
                remove
            })
            .is_some();
        if removed {
            self.session_count.fetch_sub(1, Ordering::AcqRel);
            self.metrics.sessions.dec();
        }
        removed
    }

    fn forget_if_unwatched(&self, session: &Arc<Session>) {
        // The guard has not dropped yet, so "unwatched" means only this caller.
        if session.subscribers.load(Ordering::Acquire) <= 1 {
            self.remove(session, false);
        }
    }

    /// Frees a session that ended: later connects get `204` until the TTL passes, on
    /// this instance and (through the broker) on every other one.
    pub fn finish(&self, session: &Arc<Session>, end: Bytes) {
        self.ended.insert(session.id, Instant::now());
        self.broker
            .record_end(session.id, end, self.limits.ended_ttl);
        self.remove(session, false);
    }

    /// Frees sessions unwatched for the grace period and forgets old ended sessions.
    /// Returns the freed sessions so their last messages can still be captured.
    pub fn reap(&self, now: Instant) -> Vec<Arc<Session>> {
        if self.is_closing() {
            // Kept subscribed for the history handover until the process stops.
            return Vec::new();
        }
        let grace = self.limits.session_grace;
        let idle: Vec<Arc<Session>> = self
            .sessions
            .map
            .iter()
            .filter(|s| s.idle_for(grace, now))
            .map(|s| s.clone())
            .collect();
        let freed: Vec<Arc<Session>> = idle.into_iter().filter(|s| self.remove(s, true)).collect();
        let ttl = self.limits.ended_ttl;
        self.ended.retain(|_, at| now.duration_since(*at) < ttl);
        self.slots.clients.prune(now);
        freed
    }

    /// Refuses new subscribers and closes every stream with a `shutdown` event, so
    /// browsers reconnect (elsewhere) at once. Returns the sessions that had viewers,
    /// for the history handover; sessions are no longer freed from here on.
    pub fn shutdown(&self) -> Vec<Uuid> {
        self.closing.store(true, Ordering::Release);
        let goodbye = frame::shutdown();
        let mut watched = Vec::new();
        for session in self.sessions.map.iter() {
            if session.subscribers.load(Ordering::Acquire) > 0 {
                watched.push(session.id);
            }
            let mut outbox = session.outbox.lock().unwrap();
            outbox.closed = true;
            outbox.send(Signal::Last(goodbye.clone()));
        }
        watched
    }

    /// Whether sessions can be subscribed and joined right now.
    pub fn broker_connected(&self) -> bool {
        self.broker.is_connected()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

fn rand_u64() -> u64 {
    let (hi, _) = Uuid::new_v4().as_u64_pair();
    hi
}
