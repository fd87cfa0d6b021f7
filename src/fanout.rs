//! The capture-and-fan-out loop. Every tick it captures each session that received
//! something since its last tick (exactly what is in its inbox at that instant; later
//! arrivals wait for the next tick), frames the batch once, records it for resume and
//! sends the same bytes to every subscriber: written straight to the sockets of the
//! viewers in step (`viewer`), and through the session's broadcast channel to those
//! reading at their own pace from the shared replay buffer. Sending never waits on a
//! subscriber; one that falls more than the channel's length behind is disconnected
//! (it resumes with `Last-Event-ID`). Quiet sessions cost nothing per tick: only
//! heartbeats and freeing look at them, a few times a second.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::frame;
use crate::history::{History, Item};
use crate::position::Position;
use crate::registry::Registry;
use crate::session::{Outbox, Session, Signal};

/// Where captured messages are counted (the billable usage). Called on the tick loop:
/// implementations only record, they never wait.
pub trait Usage: Send + Sync {
    /// `payloads` were captured for `session` (one count each).
    fn captured(&self, session: Uuid, payloads: &[Bytes]);
    /// `session` was freed on this instance; nothing more will be captured for it.
    fn closed(&self, session: Uuid);
}

/// How often unwatched sessions are looked for, to be freed.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Quiet sessions are looked at for heartbeats this many times per heartbeat
/// interval: a heartbeat goes out between one interval and a quarter more after the
/// last frame, and a quiet session costs a look every few seconds, not every tick.
const HEARTBEAT_CHECKS: u32 = 4;
/// A session that sent nothing for this long frees its compressor (most of what a
/// sending session holds); the next frame starts a fresh one, as a keyframe.
const COMPRESSOR_IDLE: Duration = Duration::from_secs(1);

pub struct Ticker {
    pub registry: Arc<Registry>,
    pub tick: Duration,
    pub heartbeat: Duration,
    pub usage: Arc<dyn Usage>,
    pub history: Arc<History>,
}

impl Ticker {
    pub async fn run(self, token: CancellationToken) {
        let mut interval = tokio::time::interval(self.tick);
        // An overrunning tick is followed by one tick, not by a burst of catch-ups.
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sessions = Vec::new();
        let (mut last_heartbeats, mut last_reap) = (Instant::now(), Instant::now());
        let mut tick = 0;
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = interval.tick() => {}
            }
            let now = Instant::now();
            tick += 1;
            self.tick_once(&mut sessions, now, tick);
            if now.duration_since(last_heartbeats) >= self.heartbeat / HEARTBEAT_CHECKS {
                last_heartbeats = now;
                self.heartbeats(now);
            }
            if now.duration_since(last_reap) >= REAP_INTERVAL {
                last_reap = now;
                self.reap(now);
            }
            let spent = now.elapsed();
            self.registry
                .metrics
                .tick_seconds
                .observe(spent.as_secs_f64());
        }
        // Whatever arrived since the last tick still counts as usage.
        self.tick_once(&mut sessions, Instant::now(), tick + 1);
        tracing::debug!("ticker stopped");
    }

    /// One tick (the `tick`th): captures and fans out each session that received
    /// something since its last capture, or holds frames for a delivery class.
    /// `sessions` is reused between ticks.
    pub fn tick_once(&self, sessions: &mut Vec<Arc<Session>>, now: Instant, tick: u64) {
        self.registry.sessions.take_queued(sessions);
        for session in sessions.drain(..) {
            if self.settle(&session, now, tick) {
                self.closed(session.id);
            }
        }
    }

    /// A heartbeat for each session that sent nothing for a while; a session quiet
    /// for a second gives its gzip compressor's memory back.
    fn heartbeats(&self, now: Instant) {
        for session in self.registry.sessions.map.iter() {
            let mut outbox = session.outbox.lock().unwrap();
            let quiet = now.duration_since(outbox.last_sent);
            if quiet >= COMPRESSOR_IDLE {
                outbox.viewers.release_compressor();
                outbox.classes.release_compressors();
            }
            if !outbox.closed && quiet >= self.heartbeat {
                outbox.last_sent = now;
                outbox.send(Signal::Heartbeat);
            }
        }
    }

    /// Frees the sessions unwatched for their grace period.
    fn reap(&self, now: Instant) {
        for freed in self.registry.reap(now) {
            // Freed either way; `settle` only says whether it also ended.
            self.settle(&freed, now, u64::MAX);
            self.closed(freed.id);
        }
    }

    fn closed(&self, session: Uuid) {
        self.usage.closed(session);
        self.history.closed(session);
    }

    /// Captures and fans out one session, and frees it if it ended; returns whether it
    /// did.
    fn settle(&self, session: &Arc<Session>, now: Instant, tick: u64) -> bool {
        match self.capture(session, now, tick) {
            Some(end) => {
                self.registry.finish(session, end);
                true
            }
            None => false,
        }
    }

    /// Captures and fans out one session, and delivers to its classes that are due;
    /// returns the end payload if the session ended. A session still joining the
    /// shared history is left to fill its inbox; one whose classes still hold frames
    /// is looked at again next tick.
    fn capture(&self, session: &Arc<Session>, now: Instant, tick: u64) -> Option<Bytes> {
        let mut outbox = session.outbox.lock().unwrap();
        let end = self.capture_locked(session, &mut outbox, now);
        if end.is_none() {
            outbox.deliver(tick);
            if outbox.classes.holds() {
                self.registry.sessions.touch(session);
            }
        }
        end
    }

    fn capture_locked(
        &self,
        session: &Arc<Session>,
        outbox: &mut Outbox,
        now: Instant,
    ) -> Option<Bytes> {
        let joined = session.joined.initialized();
        let (messages, end, gaps, asks) = {
            let mut inbox = session.inbox.lock().unwrap();
            // The end payload stays in the inbox so that later messages are refused.
            let end = inbox.end.clone().filter(|_| !outbox.closed);
            let idle = inbox.messages.is_empty()
                && end.is_none()
                && inbox.gaps.is_empty()
                && inbox.asks.is_empty();
            if idle {
                return None;
            }
            if !joined {
                // Left to fill until the session has joined; looked at again next tick.
                drop(inbox);
                self.registry.sessions.touch(session);
                return None;
            }
            let gaps = std::mem::take(&mut inbox.gaps);
            let asks = std::mem::take(&mut inbox.asks);
            inbox.bytes = 0;
            (std::mem::take(&mut inbox.messages), end, gaps, asks)
        };
        let fingerprints = name(outbox, &messages, &gaps);
        // Messages from before each broker outage, then the `reset` that marks it, then
        // what arrived once Redis was back: the gap is shown exactly where it is.
        let mut start = 0;
        for &at in &gaps {
            self.send_batch(
                session,
                outbox,
                &messages[start..at],
                &fingerprints[start..at],
            );
            outbox.after_reset &= at == start;
            start = at;
            if outbox.after_reset {
                continue;
            }
            // Redis pub/sub keeps nothing while disconnected: say so, in order, and keep
            // the notice in the replay buffer for clients resuming across the gap.
            let last = outbox.replay.last_message();
            let id = (last != 0).then_some(Position {
                after: last,
                reset: true,
            });
            let notice = frame::reset(id, "broker reconnected; messages may be lost");
            let seq = outbox.replay.push_notice(notice);
            outbox.send(Signal::Frame(seq));
            outbox.after_reset = true;
        }
        self.send_batch(session, outbox, &messages[start..], &fingerprints[start..]);
        outbox.after_reset &= messages.len() == start;
        if !messages.is_empty() {
            self.usage.captured(session.id, &messages);
        }
        if self.history.enabled() {
            self.history
                .record(session.id, items(&messages, &fingerprints, &gaps, &asks));
        }
        outbox.last_sent = now;
        let end = end?;
        outbox.closed = true;
        outbox.send(Signal::Last(frame::end(&end)));
        Some(end)
    }

    /// Frames `messages` (if any) once, records the batch for resume and hands it to
    /// every subscriber.
    fn send_batch(
        &self,
        session: &Session,
        outbox: &mut Outbox,
        messages: &[Bytes],
        fingerprints: &[u64],
    ) {
        if messages.is_empty() {
            return;
        }
        let metrics = &self.registry.metrics;
        let receivers = outbox.receivers() as u64;
        if receivers > 0 {
            session.established.store(true, Ordering::Release);
        }
        let count = messages.len() as u64;
        let last = *fingerprints.last().expect("one per message");
        let batch = frame::batch(Position::after(last), messages);
        let bytes = batch.bytes.len() as u64;
        let seq = outbox.replay.push_batch(batch, fingerprints.to_vec());
        metrics.batches.inc();
        metrics.batch_size.observe(count as f64);
        metrics.usage_captured.inc_by(count);
        metrics.messages_delivered.inc_by(count * receivers);
        metrics.events_delivered.inc_by(receivers);
        metrics.bytes_delivered.inc_by(bytes * receivers);
        outbox.send(Signal::Frame(seq));
    }
}

/// Fingerprints the captured messages in order, counting afresh after each gap.
fn name(outbox: &mut Outbox, messages: &[Bytes], gaps: &[usize]) -> Vec<u64> {
    let mut gaps = gaps.iter().peekable();
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        while gaps.next_if(|&&at| at == i).is_some() {
            outbox.fingerprints.gap();
        }
        out.push(outbox.fingerprints.next(message));
    }
    if gaps.next().is_some() {
        outbox.fingerprints.gap();
    }
    out
}

/// The capture as the history writer sees it: messages, gaps and join requests in the
/// order they arrived.
fn items(
    messages: &[Bytes],
    fingerprints: &[u64],
    gaps: &[usize],
    asks: &[(usize, u64)],
) -> Vec<Item> {
    let mut out = Vec::with_capacity(messages.len() + gaps.len() + asks.len());
    let (mut gaps, mut asks) = (gaps.iter().peekable(), asks.iter().peekable());
    let mut marks = |i: usize, out: &mut Vec<Item>| {
        while gaps.next_if(|&&at| at == i).is_some() {
            out.push(Item::Gap);
        }
        while let Some(&(_, ask)) = asks.next_if(|(at, _)| *at == i) {
            out.push(Item::Ask(ask));
        }
    };
    for (i, (message, fp)) in messages.iter().zip(fingerprints).enumerate() {
        marks(i, &mut out);
        out.push(Item::Message(*fp, message.clone()));
    }
    marks(messages.len(), &mut out);
    out
}
