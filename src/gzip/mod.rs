//! gzip (RFC 1952) streams whose compressed bytes are shared by a session's viewers.
//!
//! Compressing per connection would cost a compressor's memory and CPU for every
//! viewer. Instead each session runs one raw-deflate compressor over its frames
//! ([`Shared`]), flushed after every frame (`Sync`: nothing is held back, and the
//! output ends on a byte boundary), so every viewer that has received the same frames
//! since the compressor last started afresh can be sent the same bytes. Starting
//! afresh (a "keyframe": a reset compressor refers to nothing before it) is how a
//! viewer joins: until then, a viewer that connects, resumes or falls behind is sent
//! its frames as stored (uncompressed) deflate blocks ([`stored`]), which fit anywhere
//! in a deflate stream, and it joins the shared bytes at the next keyframe.
//!
//! A gzip stream ends with the CRC-32 and length of everything it carried, which is
//! each viewer's own. Viewers sent shared bytes do not pay for it per frame: the
//! session keeps one running [`Sum`] of its stream, and a viewer's own sum is worked
//! out when its stream ends, from its sum when it joined and the session's sums then
//! and now ([`Sum::since`], [`Sum::then`]).

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};

mod budget;
mod sum;

use budget::Lease;
pub use budget::{Budget, COMPRESSOR_BYTES};
pub use sum::{Append, Carried, Sum};

/// The gzip member header: deflate, no name, no time, unknown OS.
pub const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// The compression level of every gzip stream: zlib's default, the figures.
pub const LEVEL: u32 = 6;

/// Longest stored block deflate allows.
const MAX_STORED: usize = 65_535;

/// `frame` as stored deflate blocks (not the last): readable after any whole block.
pub fn stored(frame: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(frame.len() + 5 * (frame.len() / MAX_STORED + 1));
    for chunk in frame.chunks(MAX_STORED) {
        let len = chunk.len() as u16;
        out.put_u8(0);
        out.put_u16_le(len);
        out.put_u16_le(!len);
        out.put_slice(chunk);
    }
    out.freeze()
}

/// The end of a stream that carried `sum`: an empty last block, then the trailer.
pub fn finish(sum: Sum) -> [u8; 10] {
    let mut out = [0u8; 10];
    out[..2].copy_from_slice(&[0x03, 0x00]);
    out[2..].copy_from_slice(&sum.trailer());
    out
}

/// One viewer's gzip stream written by its own task: the header first, every frame as
/// stored blocks, and the trailer at the end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Writer {
    started: bool,
    pub sum: Sum,
}

impl Writer {
    /// Takes over a stream that has sent its header and carried `sum`.
    pub fn resume(sum: Sum) -> Self {
        Self { started: true, sum }
    }

    pub fn frame(&mut self, frame: &[u8]) -> Bytes {
        self.sum.add(frame);
        let block = stored(frame);
        if std::mem::replace(&mut self.started, true) {
            return block;
        }
        [&HEADER[..], &block].concat().into()
    }

    pub fn finish(&mut self) -> Bytes {
        let end = finish(self.sum);
        if std::mem::replace(&mut self.started, true) {
            return Bytes::copy_from_slice(&end);
        }
        [&HEADER[..], &end].concat().into()
    }
}

/// A running compressor and its place in the budget.
struct Running {
    deflate: Compress,
    _lease: Lease,
}

/// A session's compressor and the sum of everything its stream carried.
pub struct Shared {
    /// `None` until a frame needs it, and again once released: the next frame then
    /// starts afresh, as after a keyframe.
    running: Option<Box<Running>>,
    level: u32,
    budget: Budget,
    /// Every frame sent to the session's gzip viewers, in order.
    pub sum: Sum,
}

impl Shared {
    pub fn new(level: u32, budget: Budget) -> Self {
        Self {
            running: None,
            level,
            budget,
            sum: Sum::default(),
        }
    }

    /// Whether the next frame can continue the compressed stream (no keyframe needed).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Counts `frame` into the stream's sum without compressing it (no viewer takes
    /// the shared bytes); the next compressed frame starts afresh.
    pub fn skip(&mut self, frame: &[u8]) {
        self.sum.add(frame);
        self.running = None;
    }

    /// Compresses `frame` for every viewer in step, flushed so that it can be decoded
    /// whole at once; `key`: refer to nothing before it, so that viewers can join here.
    /// Without a compressor to be had (see [`Budget`]) the frame is sent stored, which
    /// refers to nothing either; the next frame tries again.
    pub fn compress(&mut self, frame: &[u8], key: bool) -> Bytes {
        self.sum.add(frame);
        let running = match self.running.take() {
            Some(running) => running,
            None => match self.budget.lease() {
                Some(lease) => Box::new(Running {
                    deflate: Compress::new(Compression::new(self.level), false),
                    _lease: lease,
                }),
                None => return stored(frame),
            },
        };
        let deflate = &mut self.running.insert(running).deflate;
        if key {
            deflate.reset();
        }
        let mut out = Vec::with_capacity(frame.len() / 2 + 64);
        let start = deflate.total_in();
        loop {
            let done = (deflate.total_in() - start) as usize;
            deflate
                .compress_vec(&frame[done..], &mut out, FlushCompress::Sync)
                .expect("deflate accepts any input");
            let done = (deflate.total_in() - start) as usize;
            if done == frame.len() && out.len() < out.capacity() {
                return out.into();
            }
            out.reserve(out.capacity().max(64));
        }
    }

    /// Frees the compressor (its memory is most of a session's while it sends) and
    /// its place in the budget; the next frame starts afresh.
    pub fn release(&mut self) {
        self.running = None;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::GzDecoder;
    use flate2::{Decompress, FlushDecompress};
    use proptest::prelude::*;

    use super::*;

    fn frames(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                format!(
                    "id: {i:016x}\ndata: [\"{{\\\"nickname\\\":\\\"viewer {}\\\",\\\"message\\\":\\\"안녕하세요 {i}\\\"}}\"]\n\n",
                    i % 7
                )
                .into_bytes()
            })
            .collect()
    }

    fn gunzip(stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(stream)
            .read_to_end(&mut out)
            .expect("a whole gzip stream, its CRC and length right");
        out
    }

    #[test]
    fn sums_split_and_join_as_the_bytes_do() {
        let (a, b) = (b"first part ".as_slice(), b"and the rest".as_slice());
        let whole = Sum::of(&[a, b].concat());
        assert_eq!(Sum::of(a).then(Sum::of(b)), whole);
        assert_eq!(whole.since(Sum::of(a)), Sum::of(b));
        assert_eq!(whole.since(Sum::default()), whole);
    }

    #[test]
    fn a_writer_alone_makes_a_valid_gzip_stream() {
        let mut w = Writer::default();
        let mut wire = Vec::new();
        for f in frames(3) {
            wire.extend_from_slice(&w.frame(&f));
        }
        wire.extend_from_slice(&w.finish());
        assert_eq!(gunzip(&wire), frames(3).concat());
        assert_eq!(gunzip(&Writer::default().finish()), b"");
    }

    #[test]
    fn each_compressed_frame_decodes_whole_without_the_next() {
        let mut shared = Shared::new(6, Budget::default());
        let mut inflate = Decompress::new(false);
        for (i, f) in frames(5).iter().enumerate() {
            let bytes = shared.compress(f, i == 0);
            let mut out = Vec::with_capacity(f.len() + 64);
            inflate
                .decompress_vec(&bytes, &mut out, FlushDecompress::Sync)
                .unwrap();
            assert_eq!(&out, f, "frame {i} came out whole");
        }
    }

    /// With room for one compressor, a second stream sending meanwhile is sent stored
    /// blocks (a valid stream, not smaller) and counted; it compresses once the first
    /// gives its compressor back, and a dropped stream gives its back too.
    #[test]
    fn compressors_past_the_budget_send_stored_blocks_until_one_is_given_back() {
        let budget = Budget::default();
        budget.set_bytes(COMPRESSOR_BYTES + COMPRESSOR_BYTES / 2);
        let frame = "안녕하세요, what a play ".repeat(40).into_bytes();
        let (mut a, mut b) = (
            Shared::new(6, budget.clone()),
            Shared::new(6, budget.clone()),
        );
        let (mut wire_a, mut wire_b) = (HEADER.to_vec(), HEADER.to_vec());
        wire_a.extend_from_slice(&a.compress(&frame, true));
        assert!(a.is_running());
        let refused = b.compress(&frame, true);
        assert_eq!(refused, stored(&frame), "no compressor left for b");
        assert!(!b.is_running(), "b's next frame tries again");
        wire_b.extend_from_slice(&refused);
        assert_eq!((budget.running().get(), budget.refused().get()), (1, 1));

        a.release();
        assert_eq!(budget.running().get(), 0);
        let compressed = b.compress(&frame, true);
        assert!(compressed.len() * 4 < frame.len(), "b has it now");
        wire_b.extend_from_slice(&compressed);
        assert_eq!(stored(&frame), a.compress(&frame, true), "and a waits");
        wire_a.extend_from_slice(&stored(&frame));
        wire_b.extend_from_slice(&finish(b.sum));
        assert_eq!(gunzip(&wire_b), frame.repeat(2), "b's stream is whole");

        drop(b);
        wire_a.extend_from_slice(&a.compress(&frame, true));
        assert!(a.is_running(), "b gave its compressor back when dropped");
        assert_eq!((budget.running().get(), budget.refused().get()), (1, 2));
        wire_a.extend_from_slice(&finish(a.sum));
        assert_eq!(gunzip(&wire_a), frame.repeat(3), "a's stream is whole");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Appending with the shift worked out once is appending the bytes, for any
        /// stream carried so far, across several keyframes.
        #[test]
        fn appending_a_tail_to_many_streams_is_appending_its_bytes(
            heads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..5),
            tails in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..3000), 1..4),
        ) {
            let mut carried: Vec<Carried> = heads.iter().map(|h| Sum::of(h).into()).collect();
            let mut whole: Vec<Vec<u8>> = heads.clone();
            for tail in &tails {
                let append = Append::new(Sum::of(tail));
                for (c, w) in carried.iter_mut().zip(&mut whole) {
                    *c = append.to(*c);
                    w.extend_from_slice(tail);
                }
            }
            for (c, w) in carried.iter().zip(&whole) {
                prop_assert_eq!(*c, Carried::from(Sum::of(w)));
            }
        }

        /// A viewer sent its first frames as stored blocks, then the shared bytes from
        /// a keyframe on, then its own end, reads exactly its frames, and the trailer
        /// worked out from the session's sums is right.
        #[test]
        fn a_viewer_joining_at_a_keyframe_reads_exactly_its_frames(
            n in 2usize..40,
            joined in 0usize..40,
            key in 0usize..40,
            released in proptest::option::of(0usize..40),
        ) {
            let (joined, key) = (joined % n, key % n);
            let (joined, key) = (joined.min(key), joined.max(key));
            let all = frames(n);
            let mut shared = Shared::new(6, Budget::default());
            let mut own = Writer::default();
            let mut wire = Vec::new();
            let mut at = None;
            for (i, f) in all.iter().enumerate() {
                if Some(i) == released {
                    shared.release();
                }
                if i < joined {
                    // Before this viewer came: only the session's stream.
                    shared.skip(f);
                    continue;
                }
                if i < key {
                    wire.extend_from_slice(&own.frame(f));
                    shared.skip(f);
                    continue;
                }
                if i == key {
                    at = Some((own.sum, shared.sum));
                }
                let restart = i == key || !shared.is_running();
                wire.extend_from_slice(&shared.compress(f, restart));
                if i == key && !own.started {
                    wire.splice(0..0, HEADER);
                    own.started = true;
                }
            }
            let (mine, session) = at.unwrap();
            let sum = mine.then(shared.sum.since(session));
            wire.extend_from_slice(&finish(sum));
            prop_assert_eq!(gunzip(&wire), all[joined..].concat());
        }
    }
}
