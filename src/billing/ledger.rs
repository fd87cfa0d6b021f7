//! One session's usage on this instance: the messages captured here that the usage
//! store has not counted yet, as fingerprints, and where its reports stand. Pure
//! bookkeeping, no I/O.
//!
//! Every instance subscribed to a session receives the same payloads, so a fingerprint
//! derived from the payload names the same message on every instance. The store counts
//! each fingerprint once, whichever instance (or how many) reports it: a message that
//! reached only one instance (another was still resubscribing after a Redis restart)
//! is counted, and one that reached all of them is counted once. Identical payloads
//! are told apart by their occurrence: the n-th copy of a payload within the window
//! has its own fingerprint on every instance that saw all n.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use twox_hash::XxHash3_64;

/// Fingerprints kept per session while the store cannot be reached; beyond this the
/// oldest are dropped (and counted in metrics). Redis pub/sub delivers nothing while
/// Redis is down, so only a store that refuses writes for long can fill it.
pub const MAX_UNACCOUNTED: usize = 65_536;

/// One report to the tenant: a count taken from the store, and the key that names it
/// however often it is sent.
#[derive(Clone, Debug)]
pub struct Report {
    pub count: u64,
    pub key: String,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// Captured here, not yet counted by the store; oldest first.
    unaccounted: VecDeque<u64>,
    /// How often each payload hash arrived within the window, and the arrivals in
    /// order, so that they can be forgotten once older than the window.
    occurrences: HashMap<u64, u32>,
    arrivals: VecDeque<(u64, Instant)>,
    /// The tenant accepted a report of this many, but the store has not yet recorded
    /// it as settled: record that before taking anything else for this session.
    pub unacked: Option<u64>,
    /// Taken and refused by the tenant (given back to the store): shown as pending.
    pub refused: u64,
    /// Sent without an answer: sent again as it was, before anything new is taken.
    pub unanswered: Option<Report>,
    /// Something may be waiting in the store for this session: take it next round.
    pub dirty: bool,
    /// The session was freed here: forget it once nothing is left to settle.
    pub closed: bool,
}

impl Ledger {
    /// For usage of a session not served here (left by an instance that is gone).
    pub fn orphan() -> Self {
        Self {
            closed: true,
            ..Self::default()
        }
    }

    /// Fingerprints `payloads`, captured at `now`, for the store to count.
    /// Returns how many older fingerprints had to be dropped to stay bounded.
    pub fn record(&mut self, payloads: &[Bytes], now: Instant, window: Duration) -> u64 {
        self.forget_before(now, window);
        let mut dropped = 0;
        for payload in payloads {
            let hash = XxHash3_64::oneshot(payload);
            let occurrence = self.occurrences.entry(hash).or_insert(0);
            let mut key = [0u8; 12];
            key[..8].copy_from_slice(&hash.to_le_bytes());
            key[8..].copy_from_slice(&occurrence.to_le_bytes());
            *occurrence += 1;
            self.arrivals.push_back((hash, now));
            self.unaccounted.push_back(XxHash3_64::oneshot(&key));
            if self.unaccounted.len() > MAX_UNACCOUNTED {
                self.unaccounted.pop_front();
                dropped += 1;
            }
        }
        dropped
    }

    fn forget_before(&mut self, now: Instant, window: Duration) {
        while let Some(&(hash, at)) = self.arrivals.front() {
            if now.duration_since(at) < window {
                break;
            }
            self.arrivals.pop_front();
            if let Some(n) = self.occurrences.get_mut(&hash) {
                *n -= 1;
                if *n == 0 {
                    self.occurrences.remove(&hash);
                }
            }
        }
    }

    /// The fingerprints the store has not counted yet, oldest first.
    pub fn unaccounted(&self) -> Vec<u64> {
        self.unaccounted.iter().copied().collect()
    }

    /// The store counted the first `n` of [`Ledger::unaccounted`] (later captures
    /// may have been appended meanwhile).
    pub fn accounted(&mut self, n: usize) {
        self.unaccounted.drain(..n.min(self.unaccounted.len()));
    }

    /// Captured here and not yet counted by the store: what this instance's death
    /// would lose if no other instance received the same messages.
    pub fn uncounted(&self) -> u64 {
        self.unaccounted.len() as u64
    }

    /// Captured here and not yet accepted by the tenant, as far as this instance knows.
    pub fn pending(&self) -> u64 {
        self.unaccounted.len() as u64
            + self.refused
            + self.unacked.unwrap_or(0)
            + self.unanswered.as_ref().map_or(0, |r| r.count)
    }

    /// Nothing left here to count, settle or take.
    pub fn is_settled(&self) -> bool {
        self.unaccounted.is_empty()
            && self.unacked.is_none()
            && self.unanswered.is_none()
            && !self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    fn payloads(range: std::ops::Range<usize>) -> Vec<Bytes> {
        range.map(|i| Bytes::from(format!("m{i}"))).collect()
    }

    #[test]
    fn instances_that_joined_at_different_times_agree_on_fingerprints() {
        let now = Instant::now();
        let (mut early, mut late) = (Ledger::default(), Ledger::default());
        early.record(&payloads(0..20), now, WINDOW);
        late.record(&payloads(12..20), now, WINDOW);
        assert_eq!(early.unaccounted()[12..], late.unaccounted()[..]);
    }

    #[test]
    fn repeated_payloads_get_a_fingerprint_each() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.record(&vec![Bytes::from_static(b"+1"); 6], now, WINDOW);
        let mut fps = l.unaccounted();
        fps.sort_unstable();
        fps.dedup();
        assert_eq!(fps.len(), 6);
    }

    #[test]
    fn a_gap_on_one_instance_does_not_change_the_others_fingerprints() {
        let now = Instant::now();
        let (mut a, mut b) = (Ledger::default(), Ledger::default());
        a.record(&payloads(0..10), now, WINDOW);
        b.record(&payloads(0..4), now, WINDOW);
        b.record(&payloads(7..10), now, WINDOW);
        let a = a.unaccounted();
        let b = b.unaccounted();
        assert_eq!(b[..4], a[..4]);
        assert_eq!(b[4..], a[7..]);
    }

    #[test]
    fn occurrences_are_forgotten_after_the_window() {
        let start = Instant::now();
        let mut l = Ledger::default();
        l.record(&[Bytes::from_static(b"+1")], start, WINDOW);
        l.record(&[Bytes::from_static(b"+1")], start + WINDOW, WINDOW);
        let fps = l.unaccounted();
        assert_eq!(fps[0], fps[1], "the first copy is out of the window");
        assert!(l.occurrences.len() == 1 && l.arrivals.len() == 1);
    }

    #[test]
    fn accounting_drops_only_what_was_counted() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.record(&payloads(0..3), now, WINDOW);
        let sent = l.unaccounted();
        l.record(&payloads(3..5), now, WINDOW);
        l.accounted(sent.len());
        assert_eq!(l.unaccounted().len(), 2);
        assert_eq!(l.pending(), 2);
    }

    #[test]
    fn the_unaccounted_buffer_is_bounded() {
        let now = Instant::now();
        let mut l = Ledger::default();
        let dropped = l.record(&payloads(0..MAX_UNACCOUNTED + 10), now, WINDOW);
        assert_eq!(dropped, 10);
        assert_eq!(l.unaccounted().len(), MAX_UNACCOUNTED);
    }
}
