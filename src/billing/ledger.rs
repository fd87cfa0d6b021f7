//! One session's usage on this instance: the messages captured here, as fingerprints,
//! and how far they have been billed. Pure bookkeeping, no I/O.
//!
//! Every instance subscribed to a session receives the same messages in the same order
//! (Redis pub/sub keeps per-channel order), so a fingerprint of a message *and the three
//! before it* names the same position on every instance. The instance holding the
//! session's billing lease reports its unbilled count and records the fingerprint of
//! the last message billed (the cursor). An instance that takes the lease over finds
//! that cursor in its own recent log and bills exactly what follows it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use twox_hash::XxHash3_64;

/// Fingerprints kept per session at most; beyond this the oldest are forgotten (a
/// holder still counts them: counts derive from indices, not from the log's length).
const LOG_CAP: usize = 65_536;

#[derive(Debug, Default)]
pub struct Ledger {
    /// Recent fingerprints with their capture time; `log[0]` has index `base`.
    log: VecDeque<(u64, Instant)>,
    base: u64,
    /// Holder only: every message with an index below this has been billed.
    billed_to: u64,
    /// Whether this instance held the lease at the last flush (and so `billed_to` is
    /// meaningful).
    pub holder: bool,
    /// Hashes of the last three payloads, chained into each fingerprint.
    recent: [u64; 3],
    /// The session was freed on this instance: settle, release the lease, forget it.
    pub closed: bool,
}

/// A count to report, and what settling it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub count: u64,
    /// Index just past the last message reported.
    end: u64,
    /// Fingerprint of the last message reported: the next holder's starting point.
    pub cursor: Option<u64>,
}

impl Ledger {
    /// Index just past the newest message captured here.
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    pub fn record(&mut self, payloads: &[Bytes], now: Instant) {
        for payload in payloads {
            let hash = XxHash3_64::oneshot(payload);
            let mut chained = [0u8; 32];
            for (i, h) in self.recent.iter().chain([&hash]).enumerate() {
                chained[i * 8..i * 8 + 8].copy_from_slice(&h.to_le_bytes());
            }
            self.recent = [self.recent[1], self.recent[2], hash];
            self.log.push_back((XxHash3_64::oneshot(&chained), now));
            if self.log.len() > LOG_CAP {
                self.pop_front();
            }
        }
    }

    fn pop_front(&mut self) {
        self.log.pop_front();
        self.base += 1;
    }

    /// Not the holder: nothing here is ours to bill, but recent fingerprints are kept
    /// for `window` so that a takeover can find the cursor.
    pub fn follow(&mut self, now: Instant, window: Duration) {
        self.holder = false;
        while self
            .log
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > window)
        {
            self.pop_front();
        }
    }

    /// Just acquired the lease: the previous holder billed everything up to `cursor`.
    /// With no cursor (first holder), or one older than this log, all of it is ours.
    pub fn take_over(&mut self, cursor: Option<u64>) {
        self.holder = true;
        self.billed_to = self.base;
        if let Some(pos) = cursor.and_then(|c| self.log.iter().rposition(|(fp, _)| *fp == c)) {
            self.billed_to = self.base + pos as u64 + 1;
        }
        self.drop_billed();
    }

    /// What the holder should report now, if anything.
    pub fn report(&self) -> Option<Report> {
        let end = self.end();
        (self.holder && end > self.billed_to).then(|| Report {
            count: end - self.billed_to,
            end,
            cursor: self.log.back().map(|(fp, _)| *fp),
        })
    }

    /// Unbilled messages (holder only).
    pub fn unbilled(&self) -> u64 {
        if self.holder {
            self.end() - self.billed_to
        } else {
            0
        }
    }

    /// The tenant accepted (or definitively refused) `report`.
    pub fn settle(&mut self, report: Report) {
        self.billed_to = self.billed_to.max(report.end);
        self.drop_billed();
    }

    fn drop_billed(&mut self) {
        while self.base < self.billed_to && !self.log.is_empty() {
            self.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(range: std::ops::Range<usize>) -> Vec<Bytes> {
        range.map(|i| Bytes::from(format!("m{i}"))).collect()
    }

    #[test]
    fn holder_reports_each_message_once() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.record(&payloads(0..5), now);
        l.take_over(None);
        let r = l.report().unwrap();
        assert_eq!(r.count, 5);
        l.record(&payloads(5..7), now);
        l.settle(r);
        assert_eq!(l.report().unwrap().count, 2);
    }

    #[test]
    fn a_failed_report_is_reported_again_with_what_came_since() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.take_over(None);
        l.record(&payloads(0..3), now);
        let first = l.report().unwrap();
        l.record(&payloads(3..4), now);
        assert_eq!(
            l.report().unwrap().count,
            4,
            "the failed 3 plus the new one"
        );
        l.settle(first);
        assert_eq!(l.report().unwrap().count, 1);
    }

    #[test]
    fn takeover_bills_exactly_what_follows_the_cursor() {
        let now = Instant::now();
        let (mut a, mut b) = (Ledger::default(), Ledger::default());
        a.record(&payloads(0..10), now);
        b.record(&payloads(0..10), now);
        a.take_over(None);
        b.follow(now, Duration::from_secs(10));
        let r = a.report().unwrap();
        a.settle(r);
        b.record(&payloads(10..14), now);
        b.take_over(r.cursor);
        assert_eq!(b.report().unwrap().count, 4);
    }

    #[test]
    fn fingerprints_match_across_instances_that_joined_at_different_times() {
        let now = Instant::now();
        let (mut early, mut late) = (Ledger::default(), Ledger::default());
        early.record(&payloads(0..20), now);
        late.record(&payloads(12..20), now);
        early.take_over(None);
        let r = early.report().unwrap();
        early.settle(r);
        late.record(&payloads(20..25), now);
        late.take_over(r.cursor);
        assert_eq!(late.report().unwrap().count, 5);
    }

    #[test]
    fn repeated_payloads_are_counted_each_time() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.take_over(None);
        l.record(&vec![Bytes::from_static(b"+1"); 6], now);
        assert_eq!(l.report().unwrap().count, 6);
    }

    #[test]
    fn overflow_of_the_log_does_not_lose_a_holders_count() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.take_over(None);
        l.record(&payloads(0..LOG_CAP + 10), now);
        assert_eq!(l.report().unwrap().count, (LOG_CAP + 10) as u64);
    }

    #[test]
    fn followers_forget_old_fingerprints() {
        let start = Instant::now();
        let mut l = Ledger::default();
        l.record(&payloads(0..3), start);
        l.follow(start + Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(l.log.len(), 0);
        assert_eq!(l.report(), None);
    }
}
