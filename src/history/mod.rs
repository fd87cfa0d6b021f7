//! The shared history (design: `docs/positions.md`). Every instance serving a session
//! appends what it captured to the session's history in Redis, once per tick, where it
//! continues the history; an instance that starts serving a session joins its own live
//! messages to that history, so a viewer who comes from another instance, a restarted
//! one or a dead one resumes exactly, or gets `reset` exactly where something could be
//! missing. Without Redis (one instance) there is no history and nothing to join.

mod handover;
mod join;
mod standby;
mod store;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::broker::BrokerEvent;
use crate::broker::is_join_channel;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::Sessions;
use crate::topology::Redis;
use standby::Standby;
use store::HistoryStore;
pub use store::{Cursor, Item};

/// How long a session's history outlives its last write.
const TTL: Duration = Duration::from_secs(30 * 60);

/// Who writes a session's history here: the session served on this instance, or the
/// standby watching it; each has its own view, hence its own cursor.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Writer {
    session: Uuid,
    standby: bool,
}

impl Writer {
    fn served(session: Uuid) -> Self {
        Self {
            session,
            standby: false,
        }
    }

    fn standby(session: Uuid) -> Self {
        Self {
            session,
            standby: true,
        }
    }
}

/// What the tick loop (and the standby) hand over, in order.
enum Op {
    /// The writer joined the history here, at this cursor.
    Start(Writer, Cursor),
    Items(Writer, Vec<Item>),
    /// The writer is done: forget its cursor once its items are written.
    Close(Writer),
}

/// What waits for the next write round, and the payload bytes in it.
#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    bytes: usize,
}

/// Payload bytes waiting for Redis, over all sessions.
const MAX_QUEUED_BYTES: usize = 64 << 20;

pub struct History {
    store: Option<HistoryStore>,
    /// `HISTORY_STANDBY`: writes the history of sessions served elsewhere too.
    standby: Option<Standby>,
    queue: Mutex<Queue>,
    /// Where each session's writes stand; only the writer task touches it.
    cursors: Mutex<HashMap<Writer, Cursor>>,
    /// Sessions whose join requests this instance answered (read during handover).
    answered: Mutex<HashSet<Uuid>>,
    /// Sessions another instance announced it is subscribing to, noted only once this
    /// instance is stopping (read during handover).
    subscribing: Mutex<HashSet<Uuid>>,
    stopping: AtomicBool,
    /// Longest wait of a joining session for an instance serving it to answer.
    pub handover_wait: Duration,
    metrics: Arc<Metrics>,
}

impl History {
    pub fn new(
        config: &Config,
        redis: Option<&Redis>,
        tasks: &TaskTracker,
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
    ) -> redis::RedisResult<Self> {
        let store = match redis {
            Some(redis) if config.history_messages > 0 => Some(HistoryStore::new(
                redis,
                tasks,
                config.history_messages,
                config.history_bytes,
                TTL,
            )?),
            _ => None,
        };
        let standby = (store.is_some() && config.history_standby).then(|| {
            Standby::new(
                sessions,
                config.max_sessions,
                config.inbox_bytes,
                metrics.clone(),
            )
        });
        Ok(Self {
            store,
            standby,
            queue: Mutex::new(Queue::default()),
            cursors: Mutex::new(HashMap::new()),
            answered: Mutex::new(HashSet::new()),
            subscribing: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
            handover_wait: config.handover_wait,
            metrics,
        })
    }

    /// No shared history (one instance, or benchmarks of the tick alone).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self {
            store: None,
            standby: None,
            queue: Mutex::new(Queue::default()),
            cursors: Mutex::new(HashMap::new()),
            answered: Mutex::new(HashSet::new()),
            subscribing: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
            handover_wait: Duration::ZERO,
            metrics,
        }
    }

    /// Whether there is a shared history (Redis, `HISTORY_MESSAGES` > 0).
    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// Whether the session's shared history holds this message (false without a
    /// history, or when Redis does not answer).
    pub async fn knows(&self, session: Uuid, fingerprint: u64) -> bool {
        match &self.store {
            Some(store) => store.knows(session, fingerprint).await.unwrap_or(false),
            None => false,
        }
    }

    /// Whether this instance listens to every session for the history.
    pub fn is_standby(&self) -> bool {
        self.standby.is_some()
    }

    /// The broker's events: announcements of subscriptions (for the handover), and
    /// everything for the standby. Never waits.
    pub fn on_broker_event(&self, event: &BrokerEvent<'_>) {
        if let BrokerEvent::Message { channel, payload } = event
            && is_join_channel(channel)
            && self.stopping.load(Ordering::Acquire)
            && let Some(session) = crate::session::parse_subscribing(payload)
        {
            self.subscribing.lock().unwrap().insert(session);
        }
        if let Some(standby) = &self.standby {
            standby.on_broker_event(event);
        }
    }

    /// What the tick loop captured for `session`, in order. Never waits.
    /// While Redis is slow, what waits for it is bounded (`MAX_QUEUED_BYTES`): beyond,
    /// the history gets a gap instead of the messages.
    pub fn record(&self, session: Uuid, items: Vec<Item>) {
        if !self.enabled() || items.is_empty() {
            return;
        }
        let bytes: usize = items
            .iter()
            .map(|i| match i {
                Item::Message(_, payload) => payload.len(),
                _ => 0,
            })
            .sum();
        let mut queue = self.queue.lock().unwrap();
        let items = if queue.bytes + bytes > MAX_QUEUED_BYTES {
            self.metrics.history_write_errors.inc();
            vec![Item::Gap]
        } else {
            queue.bytes += bytes;
            items
        };
        queue.ops.push(Op::Items(Writer::served(session), items));
    }

    /// `session` was freed on this instance.
    pub fn closed(&self, session: Uuid) {
        if self.enabled() {
            self.queue
                .lock()
                .unwrap()
                .ops
                .push(Op::Close(Writer::served(session)));
        }
    }

    fn start(&self, session: Uuid, cursor: Cursor) {
        if self.enabled() {
            self.queue
                .lock()
                .unwrap()
                .ops
                .push(Op::Start(Writer::served(session), cursor));
        }
    }

    /// Takes the sessions whose join requests were answered since the last call.
    fn take_answered(&self) -> HashSet<Uuid> {
        std::mem::take(&mut self.answered.lock().unwrap())
    }

    /// Writes what was recorded every `tick` until cancelled, then once more.
    pub async fn run(self: Arc<Self>, tick: Duration, token: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = interval.tick() => {}
            }
            self.write_round().await;
        }
        self.write_round().await;
    }

    /// One pipelined round: each session's items since the last round, from its
    /// cursor. A failed round leaves every written session's cursor at a gap, so the
    /// history marks where it may have missed something.
    async fn write_round(&self) {
        let Some(store) = &self.store else { return };
        let mut ops = std::mem::take(&mut *self.queue.lock().unwrap()).ops;
        if let Some(standby) = &self.standby {
            let (runs, gone) = standby.drain();
            ops.extend(
                runs.into_iter()
                    .map(|(id, items)| Op::Items(Writer::standby(id), items)),
            );
            ops.extend(gone.into_iter().map(|id| Op::Close(Writer::standby(id))));
        }
        if ops.is_empty() {
            return;
        }
        let mut runs: Vec<(Uuid, Cursor, Vec<Item>)> = Vec::new();
        let mut writers: Vec<Writer> = Vec::new();
        let mut closed = Vec::new();
        {
            let mut cursors = self.cursors.lock().unwrap();
            let mut at: HashMap<Writer, usize> = HashMap::new();
            for op in ops {
                match op {
                    Op::Start(writer, cursor) => {
                        closed.retain(|w| *w != writer);
                        cursors.insert(writer, cursor);
                    }
                    Op::Items(writer, items) => {
                        let i = *at.entry(writer).or_insert_with(|| {
                            let cursor = *cursors.get(&writer).unwrap_or(&Cursor::Unjoined);
                            runs.push((writer.session, cursor, Vec::new()));
                            writers.push(writer);
                            runs.len() - 1
                        });
                        runs[i].2.extend(items);
                    }
                    Op::Close(writer) => closed.push(writer),
                }
            }
        }
        let result = if runs.is_empty() {
            Ok(Vec::new())
        } else {
            store.append(&runs).await
        };
        let mut cursors = self.cursors.lock().unwrap();
        match result {
            Ok(after) => {
                let mut answered = self.answered.lock().unwrap();
                for (writer, (cursor, asks)) in writers.iter().zip(after) {
                    cursors.insert(*writer, cursor);
                    if asks > 0 && !writer.standby {
                        answered.insert(writer.session);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(sessions = runs.len(), error = %e, "history write failed");
                self.metrics.history_write_errors.inc();
                for writer in &writers {
                    cursors.insert(*writer, Cursor::Gap);
                }
            }
        }
        for writer in closed {
            cursors.remove(&writer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_waits_for_redis_is_bounded_and_marked_as_a_gap() {
        // A store that is never reached: the queue is all there is.
        let config =
            Config::from_lookup(|k| (k == "REDIS_URL").then(|| "redis://127.0.0.1:1".into()))
                .unwrap();
        let metrics = Arc::new(Metrics::new());
        let sessions = Arc::new(Sessions::new(1 << 20, 1 << 30, metrics.clone()));
        let tasks = TaskTracker::new();
        let redis = Redis::start(
            config.redis.clone().unwrap(),
            &tasks,
            CancellationToken::new(),
        );
        let history = History::new(&config, Some(&redis), &tasks, sessions, metrics).unwrap();
        let session = Uuid::new_v4();
        let big = bytes::Bytes::from(vec![b'x'; 1 << 20]);
        for i in 0..100 {
            history.record(session, vec![Item::Message(i + 1, big.clone())]);
        }
        let queue = history.queue.lock().unwrap();
        assert!(queue.bytes <= MAX_QUEUED_BYTES);
        assert!(matches!(
            queue.ops.last(),
            Some(Op::Items(_, items)) if matches!(items[..], [Item::Gap])
        ));
    }
}
