//! The per-session replay buffer: recent framed batches, kept so that a client that
//! reconnects with `Last-Event-ID` gets exactly what it missed. Bounded by count and
//! by bytes; what falls out is gone and the client is told so (`reset`).

use std::collections::VecDeque;

use bytes::Bytes;

/// What a resuming client gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// The frames after the client's position, oldest first (possibly none).
    Frames(Vec<Bytes>),
    /// The position is unknown or older than the buffer: history is lost.
    Lost,
}

/// Frames with consecutive sequence numbers, the newest being `head`.
#[derive(Debug)]
pub struct ReplayBuffer {
    frames: VecDeque<Bytes>,
    /// Sequence number of the newest batch ever pushed (0 before the first).
    head: u64,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl ReplayBuffer {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            head: 0,
            bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    /// Sequence number of the newest batch (0 before the first).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Records batch `head + 1` and returns its sequence number.
    pub fn push(&mut self, frame: Bytes) -> u64 {
        self.head += 1;
        self.bytes += frame.len();
        self.frames.push_back(frame);
        // The newest frame always stays: live subscribers read it from here.
        while self.frames.len() > 1
            && (self.frames.len() > self.max_frames || self.bytes > self.max_bytes)
        {
            let Some(old) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= old.len();
        }
        self.head
    }

    /// The frame with sequence number `seq`, if it is still kept.
    pub fn get(&self, seq: u64) -> Option<Bytes> {
        let oldest = self.head + 1 - self.frames.len() as u64;
        let at = seq.checked_sub(oldest)?;
        self.frames.get(usize::try_from(at).ok()?).cloned()
    }

    /// The frames after `seq`, or `Lost` when some of them are no longer kept or `seq`
    /// was never issued.
    pub fn since(&self, seq: u64) -> Resume {
        if seq > self.head {
            return Resume::Lost;
        }
        let missed = (self.head - seq) as usize;
        if missed > self.frames.len() {
            return Resume::Lost;
        }
        let skip = self.frames.len() - missed;
        Resume::Frames(self.frames.iter().skip(skip).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(max_frames: usize, max_bytes: usize, n: u64) -> ReplayBuffer {
        let mut b = ReplayBuffer::new(max_frames, max_bytes);
        for i in 1..=n {
            assert_eq!(b.push(Bytes::from(format!("f{i}"))), i);
        }
        b
    }

    fn frames(names: &[&str]) -> Resume {
        Resume::Frames(names.iter().map(|n| Bytes::from(n.to_string())).collect())
    }

    #[test]
    fn returns_exactly_the_missed_frames() {
        let b = buffer(10, 1000, 5);
        assert_eq!(b.since(5), frames(&[]));
        assert_eq!(b.since(3), frames(&["f4", "f5"]));
        assert_eq!(b.since(0), frames(&["f1", "f2", "f3", "f4", "f5"]));
    }

    #[test]
    fn too_old_or_unknown_positions_are_lost() {
        let b = buffer(3, 1000, 5);
        assert_eq!(b.since(2), frames(&["f3", "f4", "f5"]));
        assert_eq!(b.since(1), Resume::Lost);
        assert_eq!(b.since(6), Resume::Lost);
    }

    #[test]
    fn frames_are_found_by_sequence_number_while_kept() {
        let b = buffer(3, 1000, 5);
        assert_eq!(b.get(5), Some(Bytes::from("f5")));
        assert_eq!(b.get(3), Some(Bytes::from("f3")));
        assert_eq!(b.get(2), None, "evicted");
        assert_eq!(b.get(6), None, "not yet");
        assert_eq!(buffer(3, 1000, 0).get(1), None);
    }

    #[test]
    fn byte_bound_evicts_oldest() {
        let b = buffer(100, 4, 5);
        assert_eq!(b.since(3), frames(&["f4", "f5"]));
        assert_eq!(b.since(2), Resume::Lost);
        let newest_only = buffer(0, 0, 3);
        assert_eq!(newest_only.since(3), frames(&[]));
        assert_eq!(
            newest_only.since(2),
            frames(&["f3"]),
            "the newest always stays"
        );
        assert_eq!(newest_only.since(1), Resume::Lost);
    }
}
