//! Positions in a session's stream that mean the same on every instance: each message
//! is named by a fingerprint of its payload and of how many identical payloads came
//! just before it, so every instance that received the same messages names them the
//! same way, however it batched them. A viewer's `Last-Event-ID` is the fingerprint of
//! the last message it got.

use std::collections::{HashMap, VecDeque};

use twox_hash::XxHash3_64;

/// How many recent messages tell identical payloads apart. The shared history keeps at
/// least this many, so an instance that joins from it counts the same way.
pub const WINDOW: usize = 1024;

/// What a viewer has: everything up to and including the message `after` (0: nothing
/// this instance can name), and, with `reset`, the gap notice that followed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub after: u64,
    pub reset: bool,
}

const RESET_SUFFIX: &str = ".reset";

impl Position {
    pub fn after(fingerprint: u64) -> Self {
        Self {
            after: fingerprint,
            reset: false,
        }
    }

    /// Parses a `Last-Event-ID`; anything else (including the `<boot>-<seq>` form of
    /// earlier versions) is unknown, which the caller answers with `reset`.
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        let (hex, reset) = match raw.strip_suffix(RESET_SUFFIX) {
            Some(hex) => (hex, true),
            None => (raw, false),
        };
        if hex.len() != 16 {
            return None;
        }
        let after = u64::from_str_radix(hex, 16).ok()?;
        Some(Self { after, reset })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.after)?;
        if self.reset {
            f.write_str(RESET_SUFFIX)?;
        }
        Ok(())
    }
}

/// Names a session's messages in arrival order.
#[derive(Debug, Default)]
pub struct Fingerprinter {
    /// Payload hashes of the last [`WINDOW`] messages, and how often each occurs there.
    recent: VecDeque<u64>,
    counts: HashMap<u64, u32>,
}

impl Fingerprinter {
    /// The fingerprint of the next message; never 0.
    pub fn next(&mut self, payload: &[u8]) -> u64 {
        let hash = XxHash3_64::oneshot(payload);
        let occurrence = self.counts.entry(hash).or_insert(0);
        let mut key = [0u8; 12];
        key[..8].copy_from_slice(&hash.to_le_bytes());
        key[8..].copy_from_slice(&occurrence.to_le_bytes());
        *occurrence += 1;
        self.recent.push_back(hash);
        if self.recent.len() > WINDOW
            && let Some(old) = self.recent.pop_front()
            && let Some(n) = self.counts.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&old);
            }
        }
        XxHash3_64::oneshot(&key).max(1)
    }

    /// Messages may be missing here: start counting afresh, as an instance that
    /// joins after the gap would.
    pub fn gap(&mut self) {
        self.recent.clear();
        self.counts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_old_ids_are_unknown() {
        for p in [
            Position::after(0xab),
            Position {
                after: u64::MAX,
                reset: true,
            },
        ] {
            assert_eq!(Position::parse(&p.to_string()), Some(p));
        }
        for bad in ["", "00000000000000ab-7", "zz", "ab", "00000000000000ab.x"] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn instances_that_saw_the_same_messages_agree() {
        let (mut a, mut b) = (Fingerprinter::default(), Fingerprinter::default());
        let msgs = ["x", "y", "x", "x", "z"];
        let fa: Vec<u64> = msgs.iter().map(|m| a.next(m.as_bytes())).collect();
        let fb: Vec<u64> = msgs.iter().map(|m| b.next(m.as_bytes())).collect();
        assert_eq!(fa, fb);
        let mut unique = fa.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            msgs.len(),
            "repeated payloads get their own names"
        );
    }

    #[test]
    fn a_repeat_beyond_the_window_is_named_like_the_first() {
        let mut f = Fingerprinter::default();
        let first = f.next(b"same");
        for i in 0..WINDOW {
            f.next(i.to_string().as_bytes());
        }
        assert_eq!(f.next(b"same"), first);
    }
}
