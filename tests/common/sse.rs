//! A linear-time SSE parser for the tests (the event-stream crate rescans its buffer
//! on every read, which is quadratic in an event's size and too slow for the
//! megabyte-sized batches of the load tests in a debug build).

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};

/// One dispatched event, as a browser's EventSource sees it.
#[derive(Clone, Debug, Default)]
pub struct Event {
    /// `message` unless the event names itself.
    pub event: String,
    pub data: String,
    /// The `id:` field of this event, empty if it had none.
    pub id: String,
}

pub struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// Set for a `Content-Encoding: gzip` response: decoded as it arrives.
    pub gunzip: Option<Gunzip>,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for an event's end.
    scanned: usize,
    ready: VecDeque<Event>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        let gzip = response
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip");
        Self {
            gunzip: gzip.then(Gunzip::default),
            body: response.bytes_stream().boxed(),
            buf: Vec::new(),
            scanned: 0,
            ready: VecDeque::new(),
        }
    }

    /// The next event; `None` at the end of the stream; `Err` if reading failed.
    pub async fn next(&mut self) -> Option<Result<Event, String>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            match self.body.next().await? {
                Ok(chunk) => match self.gunzip.as_mut() {
                    Some(gunzip) => {
                        let text = gunzip.feed(&chunk);
                        self.feed(&text);
                    }
                    None => self.feed(&chunk),
                },
                Err(e) => return Some(Err(format!("{e:?}"))),
            }
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        let mut i = self.scanned.max(1);
        while i < self.buf.len() {
            if self.buf[i] == b'\n' && self.buf[i - 1] == b'\n' {
                let block = String::from_utf8_lossy(&self.buf[start..i - 1]).into_owned();
                if let Some(event) = parse(&block) {
                    self.ready.push_back(event);
                }
                start = i + 1;
                i = start + 1;
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
    }
}

/// A gzip body decoded as it arrives, as a browser does: the bytes of each write
/// must decode at once, with nothing held back for later ones.
pub struct Gunzip {
    /// Everything received, for checking the whole stream (trailer included) at its end.
    pub wire: Vec<u8>,
    inflate: flate2::Decompress,
    ended: bool,
}

impl Default for Gunzip {
    fn default() -> Self {
        Self {
            wire: Vec::new(),
            inflate: flate2::Decompress::new(false),
            ended: false,
        }
    }
}

impl Gunzip {
    const HEADER: usize = 10;

    /// The text decoded from what arrived so far.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.wire.extend_from_slice(chunk);
        let mut out = Vec::new();
        while !self.ended && self.wire.len() > Self::HEADER {
            let at = Self::HEADER + self.inflate.total_in() as usize;
            if at >= self.wire.len() {
                break;
            }
            out.reserve(4 * (self.wire.len() - at) + 1024);
            let before = (self.inflate.total_in(), out.len());
            let status = self
                .inflate
                .decompress_vec(&self.wire[at..], &mut out, flate2::FlushDecompress::Sync)
                .expect("a valid deflate stream");
            self.ended = status == flate2::Status::StreamEnd;
            if (self.inflate.total_in(), out.len()) == before {
                break;
            }
        }
        out
    }

    /// The whole stream decoded by a strict decoder: its CRC and length checked.
    pub fn whole(&self) -> Result<Vec<u8>, std::io::Error> {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(self.wire.as_slice()).read_to_end(&mut out)?;
        Ok(out)
    }
}

/// One block of lines; `None` when it carries no data (comments, `retry:`).
fn parse(block: &str) -> Option<Event> {
    let mut event = Event::default();
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event.event = value.to_string(),
            "data" => data.push(value),
            "id" => event.id = value.to_string(),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    event.data = data.join("\n");
    if event.event.is_empty() {
        event.event = "message".into();
    }
    Some(event)
}
