//! The SSE wire format. Every frame is built once into `Bytes` and then shared by all
//! subscribers of a session, so the hot path copies nothing per subscriber.

use std::fmt::Write as _;
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

/// The payloads of `batch` from the one starting at `offset` on, as a batch of their
/// own named `id` (the original batch's last message).
pub fn tail(batch: &Bytes, offset: u32, id: Position) -> Bytes {
    let rest = &batch[offset as usize..batch.len() - b"]\n\n".len()];
    let mut out = BytesMut::with_capacity(rest.len() + 48);
    put_id(&mut out, id);
    out.put_slice(b"data: [");
    out.put_slice(rest);
    out.put_slice(b"]\n\n");
    out.freeze()
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

        /// A resume inside a batch gets exactly the payloads after its position.
        #[test]
        fn a_batch_cut_at_any_payload_holds_the_rest(
            payloads in prop::collection::vec(".{0,16}", 1..8),
            cut in 0usize..8,
        ) {
            let payloads: Vec<Bytes> = payloads.into_iter().map(Bytes::from).collect();
            let cut = cut % payloads.len();
            let framed = batch(ID, &payloads);
            let rest = tail(&framed.bytes, framed.offsets[cut], ID);
            let text = std::str::from_utf8(&rest).unwrap();
            let data = text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
            let parsed: Vec<String> = serde_json::from_str(data).unwrap();
            let expected: Vec<String> = payloads[cut..]
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            prop_assert_eq!(parsed, expected);
        }
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
