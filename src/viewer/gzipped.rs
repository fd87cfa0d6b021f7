//! A session's in-step viewers of its gzip stream, and the compressor they share.
//!
//! What each viewer keeps is what its stream carried at the session's last keyframe
//! ([`gzip::Carried`], 8 bytes), so that an idle gzip viewer costs about what a plain
//! one does. At every keyframe all of them move on to it together: the bytes the
//! session sent since the previous one are appended to each viewer's CRC with one
//! shift worked out for the lot ([`gzip::Append`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Behind, Viewer, Written, write};
use crate::gzip;
use crate::metrics::GzipMeter;

/// Least time between two keyframes made for joining viewers: each costs the next
/// frame the compressor's memory of what came before.
const KEYFRAME_SPACING: Duration = Duration::from_secs(1);

pub struct Gzipped {
    /// Viewers sent the shared bytes since the last keyframe, and what each stream
    /// had carried at it.
    list: Vec<(Arc<Viewer>, gzip::Carried)>,
    /// Viewers sent stored blocks until the next keyframe, and what each stream
    /// carried so far.
    waiting: Vec<(Arc<Viewer>, gzip::Carried)>,
    stream: gzip::Shared,
    /// The session's stream at the last keyframe.
    key_at: gzip::Sum,
    last_key: Option<Instant>,
    meter: GzipMeter,
}

impl Gzipped {
    pub fn new(meter: GzipMeter) -> Self {
        Self {
            list: Vec::new(),
            waiting: Vec::new(),
            stream: gzip::Shared::new(gzip::LEVEL, meter.compressors.clone()),
            key_at: gzip::Sum::default(),
            last_key: None,
            meter,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len() + self.waiting.len()
    }

    /// Adds a viewer whose stream carried `sum`; it waits for the next keyframe.
    pub fn join(&mut self, viewer: Arc<Viewer>, sum: gzip::Sum) {
        self.waiting.push((viewer, sum.into()));
    }

    /// Takes `viewer` out; false if it is not here.
    pub fn leave(&mut self, viewer: &Arc<Viewer>) -> bool {
        if let Some(at) = self.list.iter().position(|(v, _)| Arc::ptr_eq(v, viewer)) {
            self.list.swap_remove(at);
            return true;
        }
        if let Some(at) = self
            .waiting
            .iter()
            .position(|(v, _)| Arc::ptr_eq(v, viewer))
        {
            self.waiting.swap_remove(at);
            return true;
        }
        false
    }

    /// The session went quiet: the compressor's memory is given back.
    pub fn release_compressor(&mut self) {
        self.stream.release();
    }

    /// What the stream of a viewer in step carried, having carried `at` at the last
    /// keyframe.
    fn carried(&self, at: gzip::Carried) -> gzip::Sum {
        at.sum().then(self.stream.sum.since(self.key_at))
    }

    pub fn send(&mut self, bytes: &Bytes, last: bool, behind: &mut Vec<Behind>) {
        if self.len() == 0 {
            return;
        }
        if last {
            // Each stream ends with its own trailer, written by its task.
            let sums: Vec<_> = self
                .list
                .iter()
                .map(|(v, at)| (v.clone(), self.carried(*at)))
                .chain(self.waiting.iter().map(|(v, own)| (v.clone(), own.sum())))
                .collect();
            self.list.clear();
            self.waiting.clear();
            for (viewer, sum) in sums {
                let mut ends = Behind::new(&viewer, Bytes::new(), false, Some(sum));
                ends.handoff.last = Some(bytes.clone());
                behind.push(ends);
            }
            return;
        }
        let now = Instant::now();
        let key = !self.stream.is_running()
            || (!self.waiting.is_empty()
                && self
                    .last_key
                    .is_none_or(|at| now.duration_since(at) >= KEYFRAME_SPACING));
        if key {
            // Everyone in step moves on to this keyframe; those waiting join here.
            self.last_key = Some(now);
            let append = gzip::Append::new(self.stream.sum.since(self.key_at));
            for (_, at) in &mut self.list {
                *at = append.to(*at);
            }
            self.list.append(&mut self.waiting);
            self.key_at = self.stream.sum;
        }
        let shared = (!self.list.is_empty()).then(|| self.stream.compress(bytes, key));
        if shared.is_none() {
            self.stream.skip(bytes);
        }
        if let Some(shared) = &shared {
            self.meter.count(bytes.len(), shared.len(), self.list.len());
            let mut fell_behind = Vec::new();
            self.list.retain(|(viewer, at)| {
                let rest = match write(&viewer.socket, shared) {
                    Written::All => return true,
                    Written::Part(n) => Some(shared.slice(n..)),
                    Written::Failed => None,
                };
                fell_behind.push((viewer.clone(), *at, rest));
                false
            });
            for (viewer, at, rest) in fell_behind {
                let sum = self.carried(at);
                behind.push(Behind::new(
                    &viewer,
                    rest.clone().unwrap_or_default(),
                    rest.is_some(),
                    Some(sum),
                ));
            }
        }
        if !self.waiting.is_empty() {
            let stored = gzip::stored(bytes);
            self.meter
                .count(bytes.len(), stored.len(), self.waiting.len());
            self.waiting.retain_mut(|(viewer, own)| {
                let mut sum = own.sum();
                sum.add(bytes);
                *own = sum.into();
                let rest = match write(&viewer.socket, &stored) {
                    Written::All => return true,
                    Written::Part(n) => Some(stored.slice(n..)),
                    Written::Failed => None,
                };
                let continues = rest.is_some();
                behind.push(Behind::new(
                    viewer,
                    rest.unwrap_or_default(),
                    continues,
                    Some(sum),
                ));
                false
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::viewer::connected;

    /// Viewers that join at different points, wait for a keyframe and stay in step
    /// across several, each end with the sum of exactly what their stream carried.
    #[tokio::test]
    async fn each_viewer_ends_with_the_sum_of_what_its_stream_carried() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut g = Gzipped::new(GzipMeter::default());
        let (mut viewers, mut clients, mut carried) = (Vec::new(), Vec::new(), Vec::new());
        let mut behind = Vec::new();
        for i in 0..14 {
            if i % 4 == 0 {
                let (v, client) = connected(&listener).await;
                let prelude = format!("retry: {i}\n\n").into_bytes();
                g.join(v.clone(), gzip::Sum::of(&prelude));
                viewers.push(v);
                clients.push(client);
                carried.push(prelude);
            }
            if i % 3 == 2 {
                // The next frame is a keyframe: those in step move on to it.
                g.release_compressor();
            }
            let frame = Bytes::from(format!("id: {i}\ndata: [\"message {i}\"]\n\n"));
            g.send(&frame, false, &mut behind);
            carried.iter_mut().for_each(|c| c.extend_from_slice(&frame));
        }
        assert!(behind.is_empty(), "the sockets took every frame");
        let end = Bytes::from_static(b"event: end\ndata: {}\n\n");
        g.send(&end, true, &mut behind);
        assert_eq!(behind.len(), viewers.len());
        for ends in behind {
            let i = viewers
                .iter()
                .position(|v| Arc::ptr_eq(v, &ends.viewer))
                .unwrap();
            assert_eq!(
                ends.handoff.gzip,
                Some(gzip::Sum::of(&carried[i])),
                "viewer {i}"
            );
        }
    }
}
