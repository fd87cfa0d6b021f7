//! One admitted viewer: what it holds while its stream is open, and how it reads the
//! session's frames. It holds a position in the session's signals and the guard that
//! releases its slots; the frames' bytes stay in the session's replay buffer, shared.
//! A viewer that falls behind is sent what it missed merged into one batch (a few,
//! for a long absence: see `CATCH_UP_BYTES`), read from the replay buffer by sequence
//! number, so falling behind the signals (`SUBSCRIBER_BUFFER`) costs it nothing. Only
//! one whose next frame has left the replay buffer (bounded in frames and bytes) has
//! lagged too far: its stream ends and its browser resumes with `Last-Event-ID`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::class::Class;
use crate::client::ClientLimits;
use crate::frame;
use crate::gzip;
use crate::metrics::Metrics;
use crate::session::{Session, Signal};
use crate::viewer::{Handoff, Viewer};

/// An admitted subscriber: what to send first, then the session's live frames.
pub struct Subscription {
    /// What is to be sent before any signal.
    held: Option<Held>,
    /// Where it reads the session's signals; `None` while the fan-out writes to it.
    signals: Option<broadcast::Receiver<Signal>>,
    /// Set while it is one of the session's in-step viewers (see `viewer`).
    direct: Option<Arc<Viewer>>,
    guard: SubscriberGuard,
    /// The last frame went out, or the viewer lagged too far: nothing more.
    over: bool,
    /// Set for a gzip stream: encodes what this task writes, and ends the stream.
    gzip: Option<gzip::Writer>,
    /// The sequence number of the next frame it is to be sent: it has every one
    /// before, and skips the signals of those it was sent in a catch-up.
    next: u64,
    class: Class,
}

/// What a subscription sends before any signal. One field for both, since a stream
/// never has both at once (the prelude goes first, and it is not handed to the fan-out
/// until it is sent), and every idle viewer's task holds this.
enum Held {
    /// `retry:` advice, then replayed batches or a `reset`.
    Prelude(Bytes),
    /// The last frame, to be sent once everything before it was (a gzip stream's
    /// fan-out leaves it here: it ends in its task, with its own trailer).
    Last(Bytes),
}

/// Bytes of missed frames merged into one catch-up write at most: what a lagging
/// viewer holds of its own, beyond the frames shared by all.
pub const CATCH_UP_BYTES: usize = 64 * 1024;

/// Whose share of stream slots is taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    Instance,
    Client,
}

/// The stream slots subscribers take: the instance's count and each client's share.
pub struct Slots {
    pub connections: AtomicUsize,
    pub clients: ClientLimits,
    metrics: Arc<Metrics>,
}

impl Slots {
    pub fn new(clients: ClientLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            connections: AtomicUsize::new(0),
            clients,
            metrics,
        }
    }

    /// Takes an instance-wide slot (unless all `max` are taken) and one of `client`'s
    /// (unless it has its share); both or neither.
    pub fn open(&self, max: usize, client: IpAddr) -> Result<(), Full> {
        if self.connections.fetch_add(1, Ordering::AcqRel) >= max {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Instance);
        }
        if !self.clients.open_stream(client) {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Client);
        }
        self.metrics.connections.inc();
        Ok(())
    }

    /// Gives back what [`Slots::open`] took.
    pub fn release(&self, client: IpAddr) {
        self.clients.close_stream(client);
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.dec();
    }
}

/// Releases the subscriber's slots and session membership when its stream ends,
/// however it ends.
pub struct SubscriberGuard {
    slots: Arc<Slots>,
    session: Arc<Session>,
    client: IpAddr,
}

impl SubscriberGuard {
    /// For a subscriber already counted in `slots` and in `session`.
    pub fn new(slots: Arc<Slots>, session: Arc<Session>, client: IpAddr) -> Self {
        Self {
            slots,
            session,
            client,
        }
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        if self.session.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.session.idle_since.lock().unwrap() = Some(Instant::now());
        }
        self.slots.release(self.client);
    }
}

/// Why nothing more will come.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamOver;

impl Subscription {
    /// `signals` start at the frame numbered `next`; `prelude` holds what comes before.
    pub fn new(
        prelude: Bytes,
        signals: broadcast::Receiver<Signal>,
        guard: SubscriberGuard,
        next: u64,
        class: Class,
    ) -> Self {
        Self {
            held: Some(Held::Prelude(prelude)),
            signals: Some(signals),
            direct: None,
            guard,
            over: false,
            gzip: None,
            next,
            class,
        }
    }

    /// Makes this a gzip stream (see `gzip`).
    pub fn compressed(mut self) -> Self {
        self.gzip = Some(gzip::Writer::default());
        self
    }

    pub fn is_compressed(&self) -> bool {
        self.gzip.is_some()
    }

    /// Hands the socket to the fan-out if this viewer has caught up (nothing left to
    /// send); false if it has not, or its stream is over.
    pub fn go_direct(&mut self, viewer: &Arc<Viewer>) -> bool {
        if self.held.is_some() || self.over {
            return false;
        }
        let session = self.guard.session.clone();
        let mut outbox = session.outbox.lock().unwrap();
        // Frames are sent under this lock: none can fall between the check and the join.
        let head = outbox.replay.head();
        if self.signals.as_ref().is_none_or(|s| !s.is_empty()) || self.next <= head {
            return false;
        }
        outbox.join(
            self.class,
            viewer.clone(),
            self.gzip.as_ref().map(|w| w.sum),
        );
        self.signals = None;
        self.direct = Some(viewer.clone());
        self.guard.slots.metrics.viewers_in_step.inc();
        true
    }

    /// Takes the socket back from the fan-out: `rest` of a frame is to be written
    /// first, then what [`Subscription::try_next_frame`] gives.
    pub fn resume(&mut self, handoff: Handoff) -> Bytes {
        if self.direct.take().is_some() {
            self.guard.slots.metrics.viewers_in_step.dec();
        }
        // Nothing more comes (the socket failed, or the last frame was written),
        // unless the last frame is left to this task.
        self.over |= handoff.signals.is_none() && handoff.last.is_none();
        self.signals = handoff.signals;
        if let Some(sum) = handoff.gzip {
            self.gzip = Some(gzip::Writer::resume(sum));
        }
        self.held = handoff.last.map(Held::Last);
        self.next = handoff.next;
        handoff.rest
    }

    /// The next bytes to send, waiting for them; `None` once the stream is over.
    pub async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.held() {
                return Some(bytes);
            }
            if self.over {
                return self.end();
            }
            let signal = match self.signals.as_mut() {
                Some(signals) => signals.recv().await,
                None => Err(RecvError::Closed),
            };
            if let Some(bytes) = self.resolve(signal.map_err(|e| matches!(e, RecvError::Lagged(_))))
            {
                return Some(self.encode(bytes));
            }
        }
    }

    /// The next bytes to send if there are some now: `Ok(None)` if not yet.
    pub fn try_next_frame(&mut self) -> Result<Option<Bytes>, StreamOver> {
        loop {
            if let Some(bytes) = self.held() {
                return Ok(Some(bytes));
            }
            if self.over {
                return self.end().map(Some).ok_or(StreamOver);
            }
            let Some(signals) = self.signals.as_mut() else {
                return Ok(None);
            };
            let signal = match signals.try_recv() {
                // Frames whose signals it fell behind may still be kept.
                Err(TryRecvError::Empty) => return Ok(self.catch_up().map(|b| self.encode(b))),
                other => other.map_err(|e| matches!(e, TryRecvError::Lagged(_))),
            };
            if let Some(bytes) = self.resolve(signal) {
                return Ok(Some(self.encode(bytes)));
            }
        }
    }

    /// What is to be sent before any signal: the prelude, or once the last frame
    /// (`end`, `shutdown`) came, the frames it had not been sent yet, then that.
    fn held(&mut self) -> Option<Bytes> {
        let last = match self.held.take()? {
            Held::Prelude(prelude) => return Some(self.encode(prelude)),
            Held::Last(last) => last,
        };
        if let Some(missed) = self.catch_up() {
            self.held = Some(Held::Last(last));
            return Some(self.encode(missed));
        }
        if self.over {
            // It lagged too far: its browser resumes, and learns of the end then.
            return None;
        }
        self.over = true;
        Some(self.encode(last))
    }

    /// The end of a gzip stream (its trailer), once; nothing for a plain one.
    fn end(&mut self) -> Option<Bytes> {
        let end = self.gzip.take()?.finish();
        self.guard.slots.metrics.gzip.count(0, end.len(), 1);
        Some(end)
    }

    /// `frame` as this stream sends it.
    fn encode(&mut self, frame: Bytes) -> Bytes {
        let Some(writer) = self.gzip.as_mut() else {
            return frame;
        };
        let out = writer.frame(&frame);
        self.guard
            .slots
            .metrics
            .gzip
            .count(frame.len(), out.len(), 1);
        out
    }

    /// The bytes a signal stands for; `Err(true)` means the viewer fell behind the
    /// signals.
    fn resolve(&mut self, signal: Result<Signal, bool>) -> Option<Bytes> {
        match signal {
            // Sent already, in a catch-up.
            Ok(Signal::Frame(seq)) if seq < self.next => None,
            Ok(Signal::Frame(_)) | Err(true) => self.catch_up(),
            Ok(Signal::Heartbeat) => Some(frame::HEARTBEAT),
            Ok(Signal::Last(bytes)) => {
                self.held = Some(Held::Last(bytes));
                None
            }
            Err(false) => {
                self.over = true;
                None
            }
        }
    }

    /// The frames from `next` on (up to `CATCH_UP_BYTES`), merged into one batch as
    /// the viewer's class has them; `None` if there are none. A viewer whose next
    /// frame has left the replay buffer lagged too far.
    fn catch_up(&mut self) -> Option<Bytes> {
        // The lock is held for this statement only.
        let outbox = &self.guard.session.outbox;
        let Some(frames) = outbox
            .lock()
            .unwrap()
            .replay
            .from(self.next, CATCH_UP_BYTES)
        else {
            self.lagged();
            return None;
        };
        if frames.is_empty() {
            return None;
        }
        self.next += frames.len() as u64;
        let metrics = &self.guard.slots.metrics;
        if frames.len() > 1 {
            metrics.catch_ups.inc();
        }
        let merged = frame::merge(&frames, self.class.keep(), true);
        metrics.messages_skipped.inc_by(merged.skipped as u64);
        Some(merged.bytes)
    }

    fn lagged(&mut self) {
        tracing::debug!("disconnecting a slow subscriber");
        self.guard.slots.metrics.slow_subscribers.inc();
        self.over = true;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(viewer) = self.direct.take() {
            let outbox = &self.guard.session.outbox;
            outbox.lock().unwrap().leave(self.class, &viewer);
            self.guard.slots.metrics.viewers_in_step.dec();
        }
    }
}
