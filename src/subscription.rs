//! One admitted viewer: what it holds while its stream is open, and how it reads the
//! session's frames. It holds a position in the session's signals and the guard that
//! releases its slots; the frames' bytes stay in the session's replay buffer, shared.
//! A viewer that falls behind the signals (`SUBSCRIBER_BUFFER`) or whose next frame
//! has left the replay buffer (bounded in frames and bytes) has lagged too far: its
//! stream ends and its browser resumes with `Last-Event-ID`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::client::ClientLimits;
use crate::frame;
use crate::gzip;
use crate::metrics::Metrics;
use crate::session::{Session, Signal};
use crate::viewer::{Handoff, Viewer};

/// An admitted subscriber: what to send first, then the session's live frames.
pub struct Subscription {
    /// `retry:` advice, then replayed batches or a `reset`.
    prelude: Option<Bytes>,
    /// Where it reads the session's signals; `None` while the fan-out writes to it.
    signals: Option<broadcast::Receiver<Signal>>,
    /// Set while it is one of the session's in-step viewers (see `viewer`).
    direct: Option<Arc<Viewer>>,
    guard: SubscriberGuard,
    /// The last frame went out, or the viewer lagged too far: nothing more.
    over: bool,
    /// Set for a gzip stream: encodes what this task writes, and ends the stream.
    gzip: Option<gzip::Writer>,
    /// A last frame the fan-out left to this task (a gzip stream ends here).
    last: Option<Bytes>,
}

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
    pub fn new(
        prelude: Bytes,
        signals: broadcast::Receiver<Signal>,
        guard: SubscriberGuard,
    ) -> Self {
        Self {
            prelude: Some(prelude),
            signals: Some(signals),
            direct: None,
            guard,
            over: false,
            gzip: None,
            last: None,
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
        if self.prelude.is_some() || self.over {
            return false;
        }
        let session = self.guard.session.clone();
        let mut outbox = session.outbox.lock().unwrap();
        // Frames are sent under this lock: none can fall between the check and the join.
        if self.signals.as_ref().is_none_or(|s| !s.is_empty()) {
            return false;
        }
        outbox
            .viewers
            .join(viewer.clone(), self.gzip.as_ref().map(|w| w.sum));
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
        self.over |= handoff.signals.is_none();
        self.signals = handoff.signals;
        if let Some(sum) = handoff.gzip {
            self.gzip = Some(gzip::Writer::resume(sum));
        }
        self.last = handoff.last;
        handoff.rest
    }

    /// The next bytes to send, waiting for them; `None` once the stream is over.
    pub async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(bytes) = self.held() {
            return Some(bytes);
        }
        while !self.over {
            let signal = match self.signals.as_mut() {
                Some(signals) => signals.recv().await,
                None => Err(RecvError::Closed),
            };
            if let Some(bytes) = self.resolve(signal.map_err(|e| matches!(e, RecvError::Lagged(_))))
            {
                return Some(self.encode(bytes));
            }
        }
        self.end()
    }

    /// The next bytes to send if there are some now: `Ok(None)` if not yet.
    pub fn try_next_frame(&mut self) -> Result<Option<Bytes>, StreamOver> {
        if let Some(bytes) = self.held() {
            return Ok(Some(bytes));
        }
        while !self.over {
            let Some(signals) = self.signals.as_mut() else {
                return Ok(None);
            };
            let signal = match signals.try_recv() {
                Err(TryRecvError::Empty) => return Ok(None),
                other => other.map_err(|e| matches!(e, TryRecvError::Lagged(_))),
            };
            if let Some(bytes) = self.resolve(signal) {
                return Ok(Some(self.encode(bytes)));
            }
        }
        self.end().map(Some).ok_or(StreamOver)
    }

    /// What is to be sent before any signal: the prelude, or a last frame left by
    /// the fan-out.
    fn held(&mut self) -> Option<Bytes> {
        if let Some(prelude) = self.prelude.take() {
            return Some(self.encode(prelude));
        }
        let last = self.last.take()?;
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

    /// The bytes a signal stands for; `Err(true)` means the viewer lagged.
    fn resolve(&mut self, signal: Result<Signal, bool>) -> Option<Bytes> {
        match signal {
            Ok(Signal::Frame(seq)) => {
                let frame = self.guard.session.outbox.lock().unwrap().replay.get(seq);
                if frame.is_none() {
                    self.lagged();
                }
                frame
            }
            Ok(Signal::Heartbeat) => Some(frame::HEARTBEAT),
            Ok(Signal::Last(bytes)) => {
                self.over = true;
                Some(bytes)
            }
            Err(true) => {
                self.lagged();
                None
            }
            Err(false) => {
                self.over = true;
                None
            }
        }
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
            self.guard
                .session
                .outbox
                .lock()
                .unwrap()
                .viewers
                .leave(&viewer);
            self.guard.slots.metrics.viewers_in_step.dec();
        }
    }
}
