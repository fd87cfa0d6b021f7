//! A live session on this instance: its inbox (messages received since the last tick),
//! its outbox (replay buffer and the broadcast channel its subscribers read), and the
//! table of all sessions that the broker's events land in.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::broker::{BrokerEvent, END_SUFFIX, SubscribeAck, is_join_channel};
use crate::class::{Class, Classes};
use crate::gzip;
use crate::metrics::Metrics;
use crate::position::Fingerprinter;
use crate::replay::ReplayBuffer;
use crate::viewer::{Viewer, Viewers, hand_back};

/// What a session tells its subscribers. A batch (or `reset`) is named by its place in
/// the replay buffer, which holds its bytes once for everyone: the channel carries a
/// number, so what lagging subscribers pin is bounded by the buffer's bytes, not by
/// the channel's length times the size of the frames.
#[derive(Clone, Debug)]
pub enum Signal {
    /// The frame with this sequence number is in the replay buffer.
    Frame(u64),
    /// Nothing was sent for a while: a comment keeps the connection open.
    Heartbeat,
    /// The last frame (`end`, `shutdown`); the stream closes after it.
    Last(Bytes),
}

/// What arrived since the last capture.
#[derive(Default)]
pub struct Inbox {
    pub messages: Vec<Bytes>,
    /// The `{sessionId}_END` payload, once it arrived; later messages are dropped.
    pub end: Option<Bytes>,
    /// Bytes in `messages`, bounded by `INBOX_BYTES`.
    pub bytes: usize,
    /// Where the broker connection was lost, as positions in `messages`: the messages
    /// before a position arrived before the loss, those after it once Redis was back.
    /// Subscribers are told (`reset`) exactly there, so a gap is never marked ahead of
    /// messages that preceded it.
    pub gaps: Vec<usize>,
    /// Join requests of instances starting to serve the session (`history`), at their
    /// places among `messages`, with their ids.
    pub asks: Vec<(usize, u64)>,
}

impl Inbox {
    /// Marks a lost broker connection after the messages received so far.
    pub fn mark_gap(&mut self) {
        let at = self.messages.len();
        if self.gaps.last() != Some(&at) {
            self.gaps.push(at);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.end.is_none()
            && self.gaps.is_empty()
            && self.asks.is_empty()
    }
}

/// What has been sent, under one lock so that capture, fan-out, end and a new
/// subscriber's resume all see one order of batches.
pub struct Outbox {
    pub replay: ReplayBuffer,
    pub tx: broadcast::Sender<Signal>,
    /// When the last frame went out; drives heartbeats.
    pub last_sent: Instant,
    /// Set once the session ended or the server is shutting down: no new subscribers.
    pub closed: bool,
    /// Names the messages as every other instance does.
    pub fingerprints: Fingerprinter,
    /// The last frame sent was a `reset`: another one before a message would say
    /// nothing new (a broker outage is often reported more than once).
    pub after_reset: bool,
    /// The viewers in step, whose sockets the fan-out writes to itself.
    pub viewers: Viewers,
    /// The in-step viewers that asked to be sent less often (`delivery`).
    pub classes: Classes,
}

impl Outbox {
    pub fn new(replay: ReplayBuffer, buffer: usize, viewers: Viewers, classes: Classes) -> Self {
        let (tx, _) = broadcast::channel(buffer);
        Self {
            replay,
            tx,
            last_sent: Instant::now(),
            closed: false,
            fingerprints: Fingerprinter::default(),
            after_reset: false,
            viewers,
            classes,
        }
    }

    /// Sends `signal` to every subscriber: written now to the viewers in step, and
    /// through the channel to the others. A frame is held for the delivery classes
    /// ([`Outbox::deliver`]); anything else goes to them after what they held.
    pub fn send(&mut self, signal: Signal) {
        if !matches!(signal, Signal::Frame(_)) {
            // Viewers this leaves behind read what follows from the signals: this one
            // included.
            hand_back(self.classes.flush(), &self.tx, self.replay.head() + 1);
        }
        let behind = match &signal {
            Signal::Frame(seq) => {
                // Just pushed, so still kept.
                let kept = self.replay.kept(*seq);
                let bytes = kept.as_ref().map(|k| k.bytes.clone()).unwrap_or_default();
                if let Some(kept) = &kept {
                    self.classes.hold(*seq, kept);
                }
                self.viewers.send(&bytes, false)
            }
            Signal::Heartbeat => {
                let mut behind = self.viewers.send(&crate::frame::HEARTBEAT, false);
                behind.extend(self.classes.send(&crate::frame::HEARTBEAT, false));
                behind
            }
            Signal::Last(bytes) => {
                let mut behind = self.viewers.send(bytes, true);
                behind.extend(self.classes.send(bytes, true));
                behind
            }
        };
        let _ = self.tx.send(signal);
        hand_back(behind, &self.tx, self.replay.head() + 1);
    }

    /// Adds an in-step viewer of `class` that has every frame so far; `gzip`: what its
    /// gzip stream carried.
    pub fn join(&mut self, class: Class, viewer: Arc<Viewer>, gzip: Option<gzip::Sum>) {
        if class.is_every_tick() {
            self.viewers.join(viewer, gzip);
        } else {
            self.classes.join(class, viewer, gzip, self.replay.head());
        }
    }

    /// Takes an in-step viewer of `class` out (its stream is closing).
    pub fn leave(&mut self, class: Class, viewer: &Arc<Viewer>) {
        if class.is_every_tick() {
            self.viewers.leave(viewer);
        } else {
            self.classes.leave(viewer);
        }
    }

    /// Sends each delivery class what it held, if it is due at `tick`.
    pub fn deliver(&mut self, tick: u64) {
        let behind = self.classes.deliver(tick);
        hand_back(behind, &self.tx, self.replay.head() + 1);
    }

    /// Everyone a frame sent now reaches.
    pub fn receivers(&self) -> usize {
        self.tx.receiver_count() + self.viewers.len() + self.classes.len()
    }
}

pub struct Session {
    pub id: Uuid,
    /// Appended to by the broker's connection task; held only for a push or a swap.
    pub inbox: Mutex<Inbox>,
    pub outbox: Mutex<Outbox>,
    /// Open streams; the session is freed after a grace period at zero.
    pub subscribers: AtomicUsize,
    /// When `subscribers` last dropped to zero.
    pub idle_since: Mutex<Option<Instant>>,
    /// A batch reached a viewer: the session is a live one and gets the full grace
    /// period when unwatched. One that never delivered anything is freed at once, so
    /// connect-and-close churn over random ids cannot keep the session table full.
    pub established: AtomicBool,
    /// The broker's confirmation of this session's subscription.
    pub subscribed: SubscribeAck,
    /// Set once the session joined the shared history (`history`): nothing is
    /// captured, and no viewer admitted, before.
    pub joined: tokio::sync::OnceCell<()>,
    /// In the queue of sessions the next tick captures.
    queued: AtomicBool,
    /// Removed from the table: the ticker no longer captures it from its queue.
    freed: AtomicBool,
}

impl Session {
    pub fn new(
        id: Uuid,
        subscribed: SubscribeAck,
        buffer: usize,
        replay: ReplayBuffer,
        viewers: Viewers,
        classes: Classes,
    ) -> Self {
        Self {
            id,
            inbox: Mutex::new(Inbox::default()),
            outbox: Mutex::new(Outbox::new(replay, buffer, viewers, classes)),
            subscribers: AtomicUsize::new(0),
            idle_since: Mutex::new(None),
            established: AtomicBool::new(false),
            subscribed,
            joined: tokio::sync::OnceCell::new(),
            queued: AtomicBool::new(false),
            freed: AtomicBool::new(false),
        }
    }

    /// Marks the session removed from the table (see [`Sessions::take_queued`]).
    pub fn free(&self) {
        self.freed.store(true, Ordering::Release);
    }

    /// Whether nobody has watched this session for at least `grace` (or at all, if
    /// it never delivered anything).
    pub fn idle_for(&self, grace: std::time::Duration, now: Instant) -> bool {
        let grace = if self.established.load(Ordering::Acquire) {
            grace
        } else {
            std::time::Duration::ZERO
        };
        self.subscribers.load(Ordering::Acquire) == 0
            && self
                .idle_since
                .lock()
                .unwrap()
                .is_some_and(|since| now.duration_since(since) >= grace)
    }
}

/// All live sessions, keyed by id. Broker events land here.
///
/// A session whose inbox received something is queued for the next tick, so a tick
/// costs in proportion to the sessions that have something to send, not to all of
/// them (most of an instance's sessions are quiet at any moment).
pub struct Sessions {
    pub map: DashMap<Uuid, Arc<Session>>,
    queue: Mutex<Vec<Arc<Session>>>,
    max_message_bytes: usize,
    /// Bytes a session's inbox may hold between two ticks.
    max_inbox_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Sessions {
    pub fn new(max_message_bytes: usize, max_inbox_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            map: DashMap::new(),
            queue: Mutex::default(),
            max_message_bytes,
            max_inbox_bytes,
            metrics,
        }
    }

    /// Queues `session` for the next tick; every change to an inbox is followed by
    /// this.
    pub fn touch(&self, session: &Arc<Session>) {
        if !session.queued.swap(true, Ordering::SeqCst) {
            self.queue.lock().unwrap().push(session.clone());
        }
    }

    /// Moves the queued sessions into `into` (empty; its capacity is reused), leaving
    /// out those freed since. Each is unqueued, so what arrives from here on queues it
    /// again.
    pub fn take_queued(&self, into: &mut Vec<Arc<Session>>) {
        std::mem::swap(&mut *self.queue.lock().unwrap(), into);
        into.retain(|session| {
            session.queued.store(false, Ordering::SeqCst);
            !session.freed.load(Ordering::Acquire)
        });
    }

    /// The broker's sink: appends chat payloads and end notices to session inboxes.
    /// Runs on the broker connection's task, so it only takes short, synchronous locks.
    pub fn on_broker_event(&self, event: BrokerEvent<'_>) {
        match event {
            BrokerEvent::Message { channel, payload } => self.on_message(channel, payload),
            // Pattern subscriptions are the history standby's, not sessions'.
            BrokerEvent::Pattern { .. } => {}
            BrokerEvent::Disconnected => {
                self.metrics.broker_disconnects.inc();
                for session in self.map.iter() {
                    session.inbox.lock().unwrap().mark_gap();
                    self.touch(&session);
                }
            }
            BrokerEvent::Restored { channel } => {
                self.metrics.broker_disconnects.inc();
                if let Some(session) = Uuid::try_parse_ascii(channel)
                    .ok()
                    .and_then(|id| self.map.get(&id).map(|s| s.clone()))
                {
                    session.inbox.lock().unwrap().mark_gap();
                    self.touch(&session);
                }
            }
        }
    }

    fn on_message(&self, channel: &[u8], payload: Bytes) {
        if is_join_channel(channel) {
            self.on_join_request(&payload);
            return;
        }
        let (session, is_end) = match channel.strip_suffix(END_SUFFIX.as_bytes()) {
            Some(session) => (session, true),
            None => (channel, false),
        };
        let Some(session) = Uuid::try_parse_ascii(session)
            .ok()
            .and_then(|id| self.map.get(&id).map(|s| s.clone()))
        else {
            self.metrics.drop_message("unknown_session");
            return;
        };
        self.append(
            &mut session.inbox.lock().unwrap(),
            session.id,
            is_end,
            payload,
        );
        self.touch(&session);
    }

    fn append(&self, inbox: &mut Inbox, id: Uuid, is_end: bool, payload: Bytes) {
        if is_end {
            // An oversize end still ends the session, with the payload the publish API
            // would have sent.
            let payload = if payload.len() > self.max_message_bytes {
                self.metrics.drop_message("oversize_end");
                Bytes::from(serde_json::json!({ "id": id }).to_string())
            } else {
                payload
            };
            inbox.end.get_or_insert(payload);
            return;
        }
        self.metrics.messages_received.inc();
        if inbox.end.is_some() {
            self.metrics.drop_message("after_end");
        } else if payload.len() > self.max_message_bytes {
            self.metrics.drop_message("oversize");
        } else if inbox.bytes + payload.len() > self.max_inbox_bytes {
            // A burst larger than a tick may hold: dropped, counted, and shown to the
            // viewers as a gap (`reset`) right where it happened, never silently.
            self.metrics.drop_message("inbox_full");
            inbox.mark_gap();
        } else {
            inbox.bytes += payload.len();
            inbox.messages.push(payload);
        }
    }

    /// `<session> <id in hex>`: an instance starts serving the session and asks where
    /// in the stream its subscription began. Noted in order with the messages.
    fn on_join_request(&self, payload: &[u8]) {
        if parse_subscribing(payload).is_some() {
            // An announcement, for a stopping instance's handover (`history`).
            return;
        }
        let Some((id, ask)) = parse_join_request(payload) else {
            self.metrics.drop_message("bad_join_request");
            return;
        };
        if let Some(session) = self.map.get(&id).map(|s| s.clone()) {
            {
                let mut inbox = session.inbox.lock().unwrap();
                if inbox.asks.len() >= MAX_ASKS {
                    return;
                }
                let at = inbox.messages.len();
                inbox.asks.push((at, ask));
            }
            self.touch(&session);
        }
    }
}

/// `<session> <id in hex>`, as `history` publishes it.
pub fn parse_join_request(payload: &[u8]) -> Option<(Uuid, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (session, ask) = text.split_once(' ')?;
    Some((
        Uuid::try_parse(session).ok()?,
        u64::from_str_radix(ask, 16).ok()?,
    ))
}

/// `<session> +`: an instance is about to subscribe to the session.
pub fn parse_subscribing(payload: &[u8]) -> Option<Uuid> {
    let text = std::str::from_utf8(payload).ok()?;
    let (session, mark) = text.split_once(' ')?;
    (mark == crate::broker::SUBSCRIBING)
        .then(|| Uuid::try_parse(session).ok())
        .flatten()
}

/// Join requests kept per session between two ticks; more (from a misbehaving Redis
/// client) are ignored.
const MAX_ASKS: usize = 64;
