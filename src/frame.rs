//! The SSE wire format. Every frame is built once into `Bytes` and then shared by all
//! subscribers of a session, so the hot path copies nothing per subscriber.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

/// The comment line that keeps idle streams (and the proxies in front of them) open.
pub const HEARTBEAT: Bytes = Bytes::from_static(b":\n\n");

/// Identifies a batch so that a reconnecting client can say what it already has.
///
/// `boot` is random per process start, so ids never collide across restarts or
/// instances; `seq` counts the session's batches on this instance from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventId {
    pub boot: u64,
    pub seq: u64,
}

impl EventId {
    /// Parses a `Last-Event-ID` header; anything malformed is simply unknown.
    pub fn parse(raw: &str) -> Option<Self> {
        let (boot, seq) = raw.trim().split_once('-')?;
        Some(Self {
            boot: u64::from_str_radix(boot, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}-{}", self.boot, self.seq)
    }
}

/// One batch: `id: ..` and `data: ["<payload>", ...]`, the original service's format.
///
/// Each payload becomes a JSON string, so quotes, newlines and `\n\ndata:` inside a
/// payload are escaped and can neither break the array nor inject SSE lines. Payloads
/// that are not UTF-8 are forwarded with U+FFFD in place of the invalid bytes.
pub fn batch(id: EventId, payloads: &[Bytes]) -> Bytes {
    let body: usize = payloads.iter().map(|p| p.len() + 8).sum();
    let mut out = BytesMut::with_capacity(body + 48);
    put_id(&mut out, id);
    out.put_slice(b"data: [");
    for (i, payload) in payloads.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        let text = String::from_utf8_lossy(payload);
        serde_json::to_writer((&mut out).writer(), text.as_ref())
            .expect("writing a string into memory cannot fail");
    }
    out.put_slice(b"]\n\n");
    out.freeze()
}

/// `event: end` with the `{sessionId}_END` payload, forwarded as published.
pub fn end(payload: &[u8]) -> Bytes {
    named_event("end", None, &String::from_utf8_lossy(payload))
}

/// Tells a client that batches it asked for are gone; `id` is where it now stands,
/// so a later reconnect resumes from here rather than from the lost position.
pub fn reset(id: EventId, reason: &str) -> Bytes {
    let data = serde_json::json!({ "reason": reason }).to_string();
    named_event("reset", Some(id), &data)
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

fn put_id(out: &mut BytesMut, id: EventId) {
    let mut line = String::with_capacity(40);
    let _ = writeln!(line, "id: {id}");
    out.put_slice(line.as_bytes());
}

/// A named event whose data may span lines: each line gets its own `data:` field, which
/// the client joins back with `\n`, so a line break can never end the event early.
fn named_event(name: &str, id: Option<EventId>, data: &str) -> Bytes {
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
            let frame = batch(ID, &payloads);
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
            let _ = EventId::parse(&raw);
        }
    }

    const ID: EventId = EventId { boot: 0xab, seq: 7 };

    #[test]
    fn batch_is_a_json_array_of_payload_strings() {
        let frame = batch(ID, &[Bytes::from_static(br#"{"id":"p1","message":"hi"}"#)]);
        assert_eq!(
            frame,
            "id: 00000000000000ab-7\ndata: [\"{\\\"id\\\":\\\"p1\\\",\\\"message\\\":\\\"hi\\\"}\"]\n\n"
        );
    }

    #[test]
    fn payloads_cannot_inject_sse_lines() {
        let evil = Bytes::from_static(b"x\n\ndata: injected\r\nevent: end\n\n");
        let frame = batch(ID, &[evil.clone(), Bytes::from_static(b"\xff")]);
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

    #[test]
    fn event_ids_round_trip_and_reject_garbage() {
        assert_eq!(EventId::parse(&ID.to_string()), Some(ID));
        for bad in ["", "7", "zz-1", "ab-", "ab-x", "-1"] {
            assert_eq!(EventId::parse(bad), None, "{bad}");
        }
    }
}
