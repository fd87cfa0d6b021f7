//! The SSE wire format. Every frame is built once into `Bytes` and then shared by all
//! subscribers of a session, so the hot path copies nothing per subscriber.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::position::Position;

/// The comment line that keeps idle streams (and the proxies in front of them) open.
pub const HEARTBEAT: Bytes = Bytes::from_static(b":\n\n");

/// A framed batch and where each payload's JSON string starts in it, so that a
/// resume landing inside the batch can be served the rest of it without re-encoding.
#[derive(Clone, Debug)]
pub struct Batch {
    pub bytes: Bytes,
    pub offsets: Vec<u32>,
}

/// A frame as the replay buffer keeps it: a batch, with its messages' names and where
/// each payload starts in it, or a notice (`reset`: no messages).
#[derive(Debug)]
pub struct Kept {
    pub bytes: Bytes,
    pub fingerprints: Box<[u64]>,
    pub offsets: Box<[u32]>,
}

impl Kept {
    pub fn is_notice(&self) -> bool {
        self.fingerprints.is_empty()
    }
}

/// One batch: `id: ..` and `data: ["<payload>", ...]`, the original service's format.
///
/// Each payload becomes a JSON string, so quotes, newlines and `\n\ndata:` inside a
/// payload are escaped and can neither break the array nor inject SSE lines. Payloads
/// that are not UTF-8 are forwarded with U+FFFD in place of the invalid bytes.
pub fn batch(id: Position, payloads: &[Bytes]) -> Batch {
    let body: usize = payloads.iter().map(|p| p.len() + 8).sum();
    let mut out = BytesMut::with_capacity(body + 48);
    put_id(&mut out, id);
    out.put_slice(b"data: [");
    let mut offsets = Vec::with_capacity(payloads.len());
    for (i, payload) in payloads.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        offsets.push(out.len() as u32);
        let text = String::from_utf8_lossy(payload);
        serde_json::to_writer((&mut out).writer(), text.as_ref())
            .expect("writing a string into memory cannot fail");
    }
    out.put_slice(b"]\n\n");
    Batch {
        bytes: out.freeze(),
        offsets,
    }
}

/// The messages of `kept` from the `from`th on, as a batch of their own named like
/// `kept` (after its last message).
pub fn tail(kept: &Kept, from: usize) -> Kept {
    let start = kept.offsets[from] as usize;
    let rest = &kept.bytes[start..kept.bytes.len() - b"]\n\n".len()];
    let last = *kept.fingerprints.last().expect("a batch");
    let mut out = BytesMut::with_capacity(rest.len() + 48);
    put_id(&mut out, Position::after(last));
    out.put_slice(b"data: [");
    let shift = out.len() as i64 - start as i64;
    out.put_slice(rest);
    out.put_slice(b"]\n\n");
    Kept {
        bytes: out.freeze(),
        fingerprints: kept.fingerprints[from..].into(),
        offsets: kept.offsets[from..]
            .iter()
            .map(|&o| (i64::from(o) + shift) as u32)
            .collect(),
    }
}

/// `frames` (in order) as few events as they can be: each run of batches becomes one
/// batch named after its last message, and each notice stays as it is between them.
/// With `keep`, a merged batch holds only its newest `keep` messages, and, if
/// `announce`, is preceded by `event: skipped` saying how many were left out. The
/// payloads are copied as framed, never re-encoded; a single frame with nothing to
/// leave out is its own bytes.
pub fn merge(frames: &[Arc<Kept>], keep: Option<usize>, announce: bool) -> Merged {
    let fits = |k: &Kept| keep.is_none_or(|keep| k.offsets.len() <= keep);
    if let [one] = frames
        && fits(one)
    {
        return Merged {
            bytes: one.bytes.clone(),
            skipped: 0,
        };
    }
    let size: usize = frames.iter().map(|k| k.bytes.len()).sum();
    let mut out = BytesMut::with_capacity(size + 64);
    let mut run = 0;
    let mut skipped = 0;
    for (i, kept) in frames.iter().enumerate() {
        if kept.is_notice() {
            skipped += put_merged(&mut out, &frames[run..i], keep, announce);
            out.put_slice(&kept.bytes);
            run = i + 1;
        }
    }
    skipped += put_merged(&mut out, &frames[run..], keep, announce);
    Merged {
        bytes: out.freeze(),
        skipped,
    }
}

/// Frames merged, and how many messages were left out.
pub struct Merged {
    pub bytes: Bytes,
    pub skipped: usize,
}

/// `batches` (no notices) as one batch of (at most `keep` of) their messages; returns
/// how many were left out.
fn put_merged(
    out: &mut BytesMut,
    batches: &[Arc<Kept>],
    keep: Option<usize>,
    announce: bool,
) -> usize {
    let Some(last) = batches.last().and_then(|k| k.fingerprints.last()) else {
        return 0;
    };
    let total: usize = batches.iter().map(|k| k.offsets.len()).sum();
    let left_out = total.saturating_sub(keep.unwrap_or(usize::MAX));
    let mut skip = left_out;
    if skip > 0 && announce {
        out.put_slice(&skipped(skip));
    }
    put_id(out, Position::after(*last));
    out.put_slice(b"data: [");
    let mut first = true;
    for kept in batches {
        let Some(&start) = kept.offsets.get(skip) else {
            skip -= kept.offsets.len();
            continue;
        };
        skip = 0;
        if !first {
            out.put_u8(b',');
        }
        first = false;
        out.put_slice(&kept.bytes[start as usize..kept.bytes.len() - b"]\n\n".len()]);
    }
    out.put_slice(b"]\n\n");
    left_out
}

/// How many messages were left out right before the next batch, for a viewer that
/// asked for at most so many per event (`max_batch`). A named event: a client that
/// only listens to messages (the original one) never sees it.
pub fn skipped(count: usize) -> Bytes {
    named_event("skipped", None, &format!("{{\"skipped\":{count}}}"))
}

/// `event: end` with the `{sessionId}_END` payload, forwarded as published.
pub fn end(payload: &[u8]) -> Bytes {
    named_event("end", None, &String::from_utf8_lossy(payload))
}

/// Tells a client that batches it asked for are gone; `id` is where it now stands,
/// so a later reconnect resumes from here rather than from the lost position.
pub fn reset(id: Option<Position>, reason: &str) -> Bytes {
    let data = serde_json::json!({ "reason": reason }).to_string();
    named_event("reset", id, &data)
}

/// Sent to every subscriber when this instance shuts down; the stream then closes and
/// the browser's EventSource reconnects (through the load balancer, elsewhere).
pub fn shutdown() -> Bytes {
    named_event("shutdown", None, r#"{"reason":"server shutting down"}"#)
}

/// The reconnect delay advice sent first on every stream.
pub fn retry(delay: Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", delay.as_millis()))
}

fn put_id(out: &mut BytesMut, id: Position) {
    let mut line = String::with_capacity(40);
    let _ = writeln!(line, "id: {id}");
    out.put_slice(line.as_bytes());
}

/// A named event whose data may span lines: each line gets its own `data:` field, which
/// the client joins back with `\n`, so a line break can never end the event early.
fn named_event(name: &str, id: Option<Position>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 64);
    if let Some(id) = id {
        put_id(&mut out, id);
    }
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_u8(b'\n');
    for line in data.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        /// Whatever the payloads hold, a batch is one SSE event whose data is the
        /// payloads as JSON strings, in order: nothing can end it early or add a line.
        #[test]
        fn no_payload_can_break_or_inject_into_a_batch(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..8),
        ) {
            let payloads: Vec<Bytes> = payloads.into_iter().map(Bytes::from).collect();
            let frame = batch(ID, &payloads).bytes;
            let text = std::str::from_utf8(&frame).unwrap();
            prop_assert_eq!(text.matches('\n').count(), 3);
            prop_assert!(text.ends_with("]\n\n"));
            let data = text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
            let parsed: Vec<String> = serde_json::from_str(data).unwrap();
            let expected: Vec<String> =
                payloads.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
            prop_assert_eq!(parsed, expected);
        }

        #[test]
        fn any_last_event_id_parses_or_is_unknown(raw in ".{0,64}") {
            let _ = Position::parse(&raw);
        }

        /// Any run of batches, the first cut at any message (a resume inside it), merged
        /// with at most `keep` messages, is one event holding exactly the newest of them,
        /// named after the last, after one saying how many were left out.
        #[test]
        fn batches_cut_and_merged_hold_exactly_the_newest_messages(
            batches in prop::collection::vec(prop::collection::vec(".{0,16}", 1..6), 1..5),
            cut in 0usize..6,
            keep in prop::option::of(1usize..12),
        ) {
            let mut n = 0u64;
            let mut kept = Vec::new();
            let mut all: Vec<String> = Vec::new();
            for payloads in &batches {
                kept.push(Arc::new(kept_batch(&mut n, payloads)));
                all.extend(payloads.iter().cloned());
            }
            let cut = cut % batches[0].len();
            kept[0] = Arc::new(tail(&kept[0], cut));
            let all = &all[cut..];
            let merged = merge(&kept, keep, true);
            let text = std::str::from_utf8(&merged.bytes).unwrap();
            let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
            let want = keep.map_or(all.len(), |k| k.min(all.len()));
            let skipped = all.len() - want;
            if skipped > 0 {
                let announced = format!("event: skipped\ndata: {{\"skipped\":{skipped}}}");
                prop_assert_eq!(events[0], announced.as_str());
            }
            prop_assert_eq!(events.len(), 1 + usize::from(skipped > 0));
            prop_assert_eq!(merged.skipped, skipped);
            let (id, data) = events.last().unwrap().split_once("\ndata: ").unwrap();
            prop_assert_eq!(id, format!("id: {}", Position::after(n)));
            let parsed: Vec<String> = serde_json::from_str(data).unwrap();
            prop_assert_eq!(&parsed[..], &all[skipped..]);
        }
    }

    /// A batch of `payloads` named by the numbers after `n`.
    fn kept_batch(n: &mut u64, payloads: &[String]) -> Kept {
        let fingerprints: Vec<u64> = payloads
            .iter()
            .map(|_| {
                *n += 1;
                *n
            })
            .collect();
        let payloads: Vec<Bytes> = payloads.iter().map(|p| Bytes::from(p.clone())).collect();
        let framed = batch(Position::after(*n), &payloads);
        Kept {
            bytes: framed.bytes,
            fingerprints: fingerprints.into(),
            offsets: framed.offsets.into(),
        }
    }

    #[test]
    fn a_notice_stays_between_the_batches_it_separates() {
        let mut n = 0;
        let a = Arc::new(kept_batch(&mut n, &["a".into()]));
        let b = Arc::new(kept_batch(&mut n, &["b".into()]));
        let notice = Arc::new(Kept {
            bytes: reset(
                Some(Position {
                    after: 2,
                    reset: true,
                }),
                "gap",
            ),
            fingerprints: Box::default(),
            offsets: Box::default(),
        });
        let c = Arc::new(kept_batch(&mut n, &["c".into(), "d".into()]));
        let merged = merge(&[a, b, notice, c], Some(1), true);
        assert_eq!(merged.skipped, 2);
        let expected = [
            "event: skipped\ndata: {\"skipped\":1}\n\n",
            "id: 0000000000000002\ndata: [\"b\"]\n\n",
            "id: 0000000000000002.reset\nevent: reset\ndata: {\"reason\":\"gap\"}\n\n",
            "event: skipped\ndata: {\"skipped\":1}\n\n",
            "id: 0000000000000004\ndata: [\"d\"]\n\n",
        ];
        assert_eq!(
            std::str::from_utf8(&merged.bytes).unwrap(),
            expected.concat()
        );
    }

    const ID: Position = Position {
        after: 0xab,
        reset: false,
    };

    #[test]
    fn batch_is_a_json_array_of_payload_strings() {
        let frame = batch(ID, &[Bytes::from_static(br#"{"id":"p1","message":"hi"}"#)]).bytes;
        assert_eq!(
            frame,
            "id: 00000000000000ab\ndata: [\"{\\\"id\\\":\\\"p1\\\",\\\"message\\\":\\\"hi\\\"}\"]\n\n"
        );
    }

    #[test]
    fn payloads_cannot_inject_sse_lines() {
        let evil = Bytes::from_static(b"x\n\ndata: injected\r\nevent: end\n\n");
        let frame = batch(ID, &[evil.clone(), Bytes::from_static(b"\xff")]).bytes;
        let text = std::str::from_utf8(&frame).unwrap();
        assert_eq!(
            text.matches('\n').count(),
            3,
            "only the frame's own line breaks"
        );
        let data = text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
        let parsed: Vec<String> = serde_json::from_str(data).unwrap();
        assert_eq!(
            parsed,
            vec![
                String::from_utf8_lossy(&evil).into_owned(),
                "\u{fffd}".into()
            ]
        );
    }

    #[test]
    fn end_payload_spanning_lines_stays_one_event() {
        let frame = end(b"{\"id\":1,\n\"x\":2}\r\n\r\nevent: other");
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(text.starts_with("event: end\ndata: {\"id\":1,\ndata: \"x\":2}\n"));
        assert_eq!(text.matches("\n\n").count(), 1);
        assert!(text.ends_with("data: event: other\n\n"));
    }
}
