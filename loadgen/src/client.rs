//! One SSE viewer: a raw HTTP/1.1 GET, chunked decoding and SSE event splitting, with
//! no per-connection read buffer (reads go through one scratch buffer, since the
//! runtime is single-threaded), so the generator's own memory stays small at 20,000
//! connections.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::stats::{Seen, Stats};
use crate::{Args, Target, session_id};

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

pub async fn run(args: Args, session: usize, source: IpAddr, stats: Rc<RefCell<Stats>>) {
    let (stream, mut viewer) = match connect(&args, session, source).await {
        Ok(ok) => ok,
        Err(_) => {
            stats.borrow_mut().failed += 1;
            return;
        }
    };
    stats.borrow_mut().connected += 1;
    let leftover = std::mem::take(&mut viewer.pending);
    viewer.feed(&leftover, &stats);
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        let read = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            match stream.try_read(&mut scratch) {
                Ok(0) => Err(()),
                Ok(n) => {
                    viewer.feed(&scratch[..n], &stats);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(_) => Err(()),
            }
        });
        if read.is_err() {
            break;
        }
    }
    stats.borrow_mut().closed += 1;
}

async fn connect(args: &Args, session: usize, source: IpAddr) -> io::Result<(TcpStream, Viewer)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut stream = socket.connect(args.server).await?;
    stream.set_nodelay(true)?;
    let id = session_id(args.run, session);
    let path = match args.target {
        Target::ChatSync if args.query.is_empty() => format!("/api/v1/chats/sse-connect/{id}"),
        Target::ChatSync => format!("/api/v1/chats/sse-connect/{id}?{}", args.query),
        Target::Nchan => format!("/sub/{id}"),
    };
    let encoding = if args.gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: loadgen\r\nAccept: text/event-stream\r\n{encoding}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        stream.readable().await?;
        match stream.try_read(&mut buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > 16 * 1024 {
            return Err(io::ErrorKind::InvalidData.into());
        }
    };
    let headers = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    if !headers.starts_with("http/1.1 200") {
        return Err(io::Error::other(
            headers.lines().next().unwrap_or("").to_string(),
        ));
    }
    let chunked = headers.contains("transfer-encoding: chunked");
    let gzip = headers.contains("content-encoding: gzip");
    let viewer = Viewer {
        chunks: chunked.then(Dechunk::default),
        gunzip: gzip.then(Gunzip::default),
        body: Vec::new(),
        pending: head[end..].to_vec(),
        events: Vec::new(),
        seen: Seen::new(),
    };
    Ok((stream, viewer))
}

struct Viewer {
    /// `None` when the body is not chunked.
    chunks: Option<Dechunk>,
    /// Set for a gzip stream: decoded as it arrives.
    gunzip: Option<Gunzip>,
    /// The body (de-chunked, still compressed) not yet decoded; only for gzip.
    body: Vec<u8>,
    /// Raw bytes not yet decoded (only before the first read).
    pending: Vec<u8>,
    /// Decoded SSE text not yet split into events.
    events: Vec<u8>,
    seen: Seen,
}

impl Viewer {
    fn feed(&mut self, input: &[u8], stats: &RefCell<Stats>) {
        stats.borrow_mut().wire_bytes += input.len() as u64;
        let decoded = if self.gunzip.is_some() {
            &mut self.body
        } else {
            &mut self.events
        };
        match &mut self.chunks {
            Some(d) => d.decode(input, decoded),
            None => decoded.extend_from_slice(input),
        }
        if let Some(gunzip) = &mut self.gunzip {
            gunzip.decode(&mut self.body, &mut self.events);
        }
        let mut consumed = 0;
        let now = now_us();
        let mut stats = stats.borrow_mut();
        while let Some(end) = find(&self.events[consumed..], b"\n\n") {
            let event = &self.events[consumed..consumed + end];
            consumed += end + 2;
            if !event.windows(5).any(|w| w == b"data:") {
                continue;
            }
            stats.events += 1;
            scan(event, |q, t| stats.message(&mut self.seen, q, t, now));
        }
        self.events.drain(..consumed);
        if self.events.capacity() > 64 * 1024 && self.events.is_empty() {
            self.events = Vec::new();
        }
    }
}

/// A gzip body decoded as it arrives (each write of the server decodes at once).
struct Gunzip {
    header_left: usize,
    inflate: flate2::Decompress,
}

impl Default for Gunzip {
    fn default() -> Self {
        Self {
            header_left: 10,
            inflate: flate2::Decompress::new(false),
        }
    }
}

impl Gunzip {
    /// Decodes what it can of `body` into `out`, leaving the rest in `body`.
    fn decode(&mut self, body: &mut Vec<u8>, out: &mut Vec<u8>) {
        let skip = self.header_left.min(body.len());
        self.header_left -= skip;
        let mut at = skip;
        while at < body.len() {
            out.reserve(4 * (body.len() - at) + 256);
            let before = (self.inflate.total_in(), out.len());
            let status =
                self.inflate
                    .decompress_vec(&body[at..], out, flate2::FlushDecompress::Sync);
            at += (self.inflate.total_in() - before.0) as usize;
            match status {
                Ok(flate2::Status::StreamEnd) | Err(_) => {
                    at = body.len();
                    break;
                }
                Ok(_) if (self.inflate.total_in(), out.len()) == before => break,
                Ok(_) => {}
            }
        }
        body.drain(..at);
        if body.capacity() > 64 * 1024 && body.is_empty() {
            *body = Vec::new();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Finds every `"q":Q,"t":T` (plain, or escaped inside a JSON string) in an event.
fn scan(data: &[u8], mut each: impl FnMut(u64, u64)) {
    let mut i = 0;
    while let Some(p) = data[i..].iter().position(|&b| b == b'q') {
        i += p + 1;
        let Some((q, next)) = number_after_key(data, i) else {
            continue;
        };
        i = next;
        let Some(t_at) = data[i..].iter().position(|&b| b == b't') else {
            return;
        };
        let Some((t, next)) = number_after_key(data, i + t_at + 1) else {
            continue;
        };
        i = next;
        each(q, t);
    }
}

/// At `i`, just after a key letter: `":` or `\":`, then digits.
fn number_after_key(data: &[u8], mut i: usize) -> Option<(u64, usize)> {
    if data.get(i) == Some(&b'\\') {
        i += 1;
    }
    if data.get(i) != Some(&b'"') || data.get(i + 1) != Some(&b':') {
        return None;
    }
    i += 2;
    let start = i;
    let mut n = 0u64;
    while let Some(d) = data.get(i).filter(|b| b.is_ascii_digit()) {
        n = n * 10 + u64::from(d - b'0');
        i += 1;
    }
    (i > start).then_some((n, i))
}

/// HTTP/1.1 chunked transfer decoding, fed in arbitrary pieces.
#[derive(Default)]
struct Dechunk {
    state: State,
    size: usize,
}

#[derive(Default, Clone, Copy)]
enum State {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data(usize),
    DataCr,
    DataLf,
}

impl Dechunk {
    fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Size => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'0'..=b'9' => self.size = self.size * 16 + usize::from(b - b'0'),
                        b'a'..=b'f' => self.size = self.size * 16 + usize::from(b - b'a' + 10),
                        b'A'..=b'F' => self.size = self.size * 16 + usize::from(b - b'A' + 10),
                        b';' => self.state = State::Extension,
                        b'\r' => self.state = State::SizeLf,
                        _ => {}
                    }
                }
                State::Extension => {
                    if input[i] == b'\r' {
                        self.state = State::SizeLf;
                    }
                    i += 1;
                }
                State::SizeLf => {
                    i += 1;
                    self.state = State::Data(self.size);
                    self.size = 0;
                }
                State::Data(0) => self.state = State::DataCr,
                State::Data(left) => {
                    let take = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    self.state = State::Data(left - take);
                }
                State::DataCr => {
                    i += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    i += 1;
                    self.state = State::Size;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_plain_and_escaped_payloads() {
        let mut got = Vec::new();
        scan(
            br#"data: ["{\"s\":1,\"q\":17,\"t\":99,\"p\":\"xx\"}","{\"s\":1,\"q\":18,\"t\":100}"]"#,
            |q, t| got.push((q, t)),
        );
        scan(br#"data: {"s":0,"q":5,"t":7,"p":"x"}"#, |q, t| {
            got.push((q, t))
        });
        assert_eq!(got, vec![(17, 99), (18, 100), (5, 7)]);
    }

    #[test]
    fn dechunks_across_arbitrary_splits() {
        let wire = b"5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n";
        for split in 1..wire.len() {
            let (mut d, mut out) = (Dechunk::default(), Vec::new());
            d.decode(&wire[..split], &mut out);
            d.decode(&wire[split..], &mut out);
            assert_eq!(out, b"hello, world", "split at {split}");
        }
    }

    #[test]
    fn gunzips_across_arbitrary_splits() {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        encoder.write_all(b"id: 1\ndata: [\"a\"]\n\n").unwrap();
        encoder.flush().unwrap();
        encoder.write_all(b"id: 2\ndata: [\"b\"]\n\n").unwrap();
        let wire = encoder.finish().unwrap();
        for split in 1..wire.len() {
            let (mut g, mut body, mut out) = (Gunzip::default(), Vec::new(), Vec::new());
            body.extend_from_slice(&wire[..split]);
            g.decode(&mut body, &mut out);
            body.extend_from_slice(&wire[split..]);
            g.decode(&mut body, &mut out);
            assert_eq!(
                out, b"id: 1\ndata: [\"a\"]\n\nid: 2\ndata: [\"b\"]\n\n",
                "split at {split}"
            );
        }
    }
}
