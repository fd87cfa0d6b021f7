//! The per-session replay buffer: recent framed batches with the fingerprints of their
//! messages, kept so that a client that reconnects with `Last-Event-ID` (here or from
//! another instance) gets exactly what it missed. Bounded by count and by bytes; what
//! falls out is gone and the client is told so (`reset`).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;

use crate::frame::{self, Kept};
use crate::position::Position;

/// What a resuming client gets.
#[derive(Debug)]
pub enum Resume {
    /// The frames after the client's position, oldest first (possibly none); the
    /// first has sequence number `first` (it may be the rest of the batch the
    /// position falls in, cut out as a batch of its own).
    Frames { first: u64, frames: Vec<Arc<Kept>> },
    /// The position is unknown or older than the buffer: history is lost.
    Lost,
}

/// What a kept frame counts against the byte bound.
fn size(kept: &Kept) -> usize {
    kept.bytes.len() + kept.fingerprints.len() * 12
}

/// Frames with consecutive sequence numbers, the newest being `head`.
#[derive(Debug)]
pub struct ReplayBuffer {
    frames: VecDeque<Arc<Kept>>,
    /// Sequence number of the newest frame ever pushed (0 before the first).
    head: u64,
    /// The newest message ever pushed (0 before the first).
    last_message: u64,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// Every session's `bytes`, summed (`chat_sync_replay_bytes`).
    total: Gauge,
}

impl ReplayBuffer {
    pub fn new(max_frames: usize, max_bytes: usize, total: Gauge) -> Self {
        Self {
            frames: VecDeque::new(),
            head: 0,
            last_message: 0,
            bytes: 0,
            max_frames,
            max_bytes,
            total,
        }
    }

    /// What it holds, counted against the byte bound.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Sequence number of the newest frame (0 before the first).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The fingerprint of the newest message (0 before the first).
    pub fn last_message(&self) -> u64 {
        self.last_message
    }

    /// Records a batch of messages named `fingerprints`; returns its sequence number.
    pub fn push_batch(&mut self, batch: frame::Batch, fingerprints: Vec<u64>) -> u64 {
        if let Some(&last) = fingerprints.last() {
            self.last_message = last;
        }
        self.push(Kept {
            bytes: batch.bytes,
            fingerprints: fingerprints.into(),
            offsets: batch.offsets.into(),
        })
    }

    /// Records a `reset` notice; returns its sequence number.
    pub fn push_notice(&mut self, notice: Bytes) -> u64 {
        self.push(Kept {
            bytes: notice,
            fingerprints: Box::default(),
            offsets: Box::default(),
        })
    }

    fn push(&mut self, kept: Kept) -> u64 {
        self.head += 1;
        let before = self.bytes;
        self.bytes += size(&kept);
        self.frames.push_back(Arc::new(kept));
        // The newest frame always stays: live subscribers read it from here.
        while self.frames.len() > 1
            && (self.frames.len() > self.max_frames || self.bytes > self.max_bytes)
        {
            let Some(old) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= size(&old);
        }
        self.total.inc_by(self.bytes as i64 - before as i64);
        self.head
    }

    /// The frame with sequence number `seq`, if it is still kept.
    pub fn get(&self, seq: u64) -> Option<Bytes> {
        self.kept(seq).map(|k| k.bytes.clone())
    }

    /// The frame with sequence number `seq` as kept, if it still is.
    pub fn kept(&self, seq: u64) -> Option<Arc<Kept>> {
        let oldest = self.head + 1 - self.frames.len() as u64;
        let at = seq.checked_sub(oldest)?;
        self.frames.get(usize::try_from(at).ok()?).cloned()
    }

    /// The frames from `seq` on, as many as make at least `bytes` (one at least), if
    /// `seq` is still kept; none if it is not pushed yet.
    pub fn from(&self, seq: u64, bytes: usize) -> Option<Vec<Arc<Kept>>> {
        if seq > self.head {
            return Some(Vec::new());
        }
        let oldest = self.head + 1 - self.frames.len() as u64;
        let at = usize::try_from(seq.checked_sub(oldest)?).ok()?;
        Some(
            self.frames
                .iter()
                .skip(at)
                .cloned()
                .take_while(up_to(bytes))
                .collect(),
        )
    }

    /// The newest `n` messages kept here as one batch (and any notice after them), for
    /// a viewer who joins and asks for recent chat; `None` if there are none.
    pub fn recent(&self, n: usize) -> Option<Bytes> {
        let mut messages = 0;
        let mut frames: Vec<Arc<Kept>> = Vec::new();
        for kept in self.frames.iter().rev() {
            if messages >= n {
                break;
            }
            // Notices before the newest message would split the batch: left out.
            if kept.is_notice() && messages > 0 {
                continue;
            }
            messages += kept.offsets.len();
            frames.push(kept.clone());
        }
        frames.reverse();
        (messages > 0).then(|| frame::merge(&frames, Some(n), false).bytes)
    }

    /// What follows `position`: the rest of the batch it falls in (cut out as a batch
    /// of its own when the client's instance batched differently), then every later
    /// frame, as many as make at least `bytes` (the rest is read later, by sequence
    /// number); the `reset` right after it is left out if the client already got one
    /// there. `Lost` when the message is not (or no longer) kept here.
    pub fn since(&self, position: Position, bytes: usize) -> Resume {
        if position.after == 0 {
            return Resume::Lost;
        }
        // Resumes are mostly near the newest frame: look from there.
        let Some((at, index)) = self.frames.iter().enumerate().rev().find_map(|(at, k)| {
            let index = k.fingerprints.iter().rposition(|&f| f == position.after)?;
            Some((at, index))
        }) else {
            return Resume::Lost;
        };
        let found = &self.frames[at];
        let mut first = self.head + 1 - (self.frames.len() - at) as u64;
        let rest =
            (index + 1 < found.fingerprints.len()).then(|| Arc::new(frame::tail(found, index + 1)));
        if rest.is_none() {
            first += 1;
        }
        let mut later = self.frames.iter().skip(at + 1).peekable();
        if index + 1 == found.fingerprints.len()
            && position.reset
            && later.peek().is_some_and(|k| k.is_notice())
        {
            later.next();
            first += 1;
        }
        let frames = rest
            .into_iter()
            .chain(later.cloned())
            .take_while(up_to(bytes))
            .collect();
        Resume::Frames { first, frames }
    }
}

/// Takes frames while fewer than `bytes` were taken: at least one, and as many as
/// make `bytes`.
fn up_to(bytes: usize) -> impl FnMut(&Arc<Kept>) -> bool {
    let mut taken = 0;
    move |k| {
        let more = taken < bytes;
        taken += k.bytes.len();
        more
    }
}

impl Drop for ReplayBuffer {
    fn drop(&mut self) {
        self.total.dec_by(self.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batch `i` holds message `i` (fingerprint `i`), framed as `f<i>`.
    fn buffer(max_frames: usize, max_bytes: usize, n: u64) -> ReplayBuffer {
        let mut b = ReplayBuffer::new(max_frames, max_bytes, Gauge::default());
        for i in 1..=n {
            let batch = frame::Batch {
                bytes: Bytes::from(format!("f{i}")),
                offsets: vec![0],
            };
            assert_eq!(b.push_batch(batch, vec![i]), i);
        }
        b
    }

    /// What a resume gets: the first frame's sequence number and the frames' bytes;
    /// `None` when lost.
    fn sent(resume: Resume) -> Option<(u64, Vec<Bytes>)> {
        match resume {
            Resume::Frames { first, frames } => {
                Some((first, frames.iter().map(|k| k.bytes.clone()).collect()))
            }
            Resume::Lost => None,
        }
    }

    fn frames(first: u64, names: &[&str]) -> Option<(u64, Vec<Bytes>)> {
        Some((
            first,
            names.iter().map(|n| Bytes::from(n.to_string())).collect(),
        ))
    }

    #[test]
    fn returns_exactly_the_missed_frames() {
        let b = buffer(10, 1000, 5);
        assert_eq!(
            sent(b.since(Position::after(5), usize::MAX)),
            frames(6, &[])
        );
        // Bounded in bytes: at least one, and as many as make the bound.
        assert_eq!(sent(b.since(Position::after(1), 1)), frames(2, &["f2"]));
        assert_eq!(
            sent(b.since(Position::after(1), 3)),
            frames(2, &["f2", "f3"])
        );
        assert_eq!(
            sent(b.since(Position::after(3), usize::MAX)),
            frames(4, &["f4", "f5"])
        );
        assert_eq!(
            sent(b.since(Position::after(1), usize::MAX)),
            frames(2, &["f2", "f3", "f4", "f5"])
        );
    }

    #[test]
    fn too_old_or_unknown_positions_are_lost() {
        let b = buffer(3, 1000, 5);
        assert_eq!(
            sent(b.since(Position::after(3), usize::MAX)),
            frames(4, &["f4", "f5"])
        );
        assert_eq!(sent(b.since(Position::after(2), usize::MAX)), None);
        assert_eq!(sent(b.since(Position::after(6), usize::MAX)), None);
        assert_eq!(sent(b.since(Position::after(0), usize::MAX)), None);
    }

    #[test]
    fn a_position_inside_a_batch_gets_the_rest_of_it() {
        let mut b = ReplayBuffer::new(10, 1000, Gauge::default());
        let payloads: Vec<Bytes> = ["a", "b", "c"].into_iter().map(Bytes::from).collect();
        b.push_batch(frame::batch(Position::after(3), &payloads), vec![1, 2, 3]);
        assert_eq!(
            sent(b.since(Position::after(1), usize::MAX)),
            frames(1, &["id: 0000000000000003\ndata: [\"b\",\"c\"]\n\n"])
        );
        assert_eq!(
            sent(b.since(Position::after(3), usize::MAX)),
            frames(2, &[])
        );
    }

    #[test]
    fn a_reset_already_seen_is_not_sent_again() {
        let mut b = buffer(10, 1000, 2);
        b.push_notice(Bytes::from("r"));
        let batch = frame::Batch {
            bytes: Bytes::from("f3"),
            offsets: vec![0],
        };
        b.push_batch(batch, vec![3]);
        assert_eq!(
            sent(b.since(Position::after(2), usize::MAX)),
            frames(3, &["r", "f3"])
        );
        let seen = Position {
            after: 2,
            reset: true,
        };
        assert_eq!(sent(b.since(seen, usize::MAX)), frames(4, &["f3"]));
        assert_eq!(b.last_message(), 3);
    }

    #[test]
    fn frames_are_found_by_sequence_number_while_kept() {
        let b = buffer(3, 1000, 5);
        assert_eq!(b.get(5), Some(Bytes::from("f5")));
        assert_eq!(b.get(3), Some(Bytes::from("f3")));
        assert_eq!(b.get(2), None, "evicted");
        assert_eq!(b.get(6), None, "not yet");
        assert_eq!(buffer(3, 1000, 0).get(1), None);
        let from = |seq, bytes| b.from(seq, bytes).map(|f| f.len());
        assert_eq!(from(3, 1), Some(1), "at least one");
        assert_eq!(from(3, 3), Some(2), "as many as make the bytes");
        assert_eq!(from(3, usize::MAX), Some(3));
        assert_eq!(from(6, 1), Some(0), "not pushed yet");
        assert_eq!(from(2, 1), None, "evicted");
    }

    #[test]
    fn recent_messages_are_the_newest_kept_as_one_batch() {
        let mut b = ReplayBuffer::new(10, 1000, Gauge::default());
        assert_eq!(b.recent(5), None);
        for (i, names) in [&["a", "b"][..], &["c"], &["d", "e", "f"]]
            .iter()
            .enumerate()
        {
            let payloads: Vec<Bytes> = names.iter().map(|n| Bytes::from(*n)).collect();
            let fps: Vec<u64> = (0..names.len() as u64)
                .map(|j| 10 * i as u64 + j + 1)
                .collect();
            let last = *fps.last().unwrap();
            b.push_batch(frame::batch(Position::after(last), &payloads), fps);
        }
        let recent = |n| String::from_utf8(b.recent(n).unwrap().to_vec()).unwrap();
        assert_eq!(
            recent(4),
            "id: 0000000000000017\ndata: [\"c\",\"d\",\"e\",\"f\"]\n\n"
        );
        assert_eq!(recent(2), "id: 0000000000000017\ndata: [\"e\",\"f\"]\n\n");
        assert_eq!(recent(100).matches(',').count(), 5, "all six it holds");
    }

    #[test]
    fn byte_bound_evicts_oldest() {
        // Each frame counts its 2 bytes and 12 per message: three fit.
        let b = buffer(100, 42, 5);
        assert_eq!(
            sent(b.since(Position::after(3), usize::MAX)),
            frames(4, &["f4", "f5"])
        );
        assert_eq!(sent(b.since(Position::after(2), usize::MAX)), None);
        let newest_only = buffer(0, 0, 3);
        assert_eq!(
            sent(newest_only.since(Position::after(3), usize::MAX)),
            frames(4, &[])
        );
        assert_eq!(
            sent(newest_only.since(Position::after(2), usize::MAX)),
            None
        );
    }
}
