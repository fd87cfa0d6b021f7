//! A seeded random walk over the core (broker, registry, ticker, replay, and the
//! sockets the fan-out writes to) with the ticks under the test's control: publishes,
//! ticks, connects, disconnects, resumes with `Last-Event-ID` and reads interleave at
//! random, for viewers of every delivery class (`interval_ms`, `max_batch`, `history`),
//! some of them reading slowly on purpose (a small receive buffer, read now and then),
//! so that they are handed back, fall behind the signals and are caught up. Every
//! viewer's received sequence must be exactly the published sequence for the time it
//! was connected: contiguous, in order, no duplicate, starting at the first message not
//! yet captured when it connected (or at the recent ones it asked for), broken only
//! where it was told so by a `reset`, and missing only the messages a `max_batch`
//! viewer was told were skipped.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_sync::broker::{Broker, END_SUFFIX, Sink, chat_channel};
use chat_sync::class::{Asked, Class};
use chat_sync::fanout::{Ticker, Usage};
use chat_sync::history::History;
use chat_sync::metrics::Metrics;
use chat_sync::position::{Fingerprinter, Position};
use chat_sync::registry::{Limits, Registry};
use chat_sync::session::Sessions;
use chat_sync::subscription::{StreamOver, Subscription};
use futures::FutureExt;
use tokio::net::{TcpListener, TcpSocket};
use uuid::Uuid;

/// Every viewer of the walk connects from here.
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Counts what the ticker captured, as billing would.
#[derive(Default)]
struct Captured(AtomicU64);

impl Usage for Captured {
    fn captured(&self, _: Uuid, payloads: &[Bytes]) {
        self.0.fetch_add(payloads.len() as u64, Ordering::SeqCst);
    }
    fn closed(&self, _: Uuid) {}
}

/// xorshift64*: a seeded, dependency-free generator, so a failure names its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// How a viewer of the walk asks to be sent the session.
fn asked(rng: &mut Rng) -> Asked {
    let class = match rng.below(4) {
        0 => Class::default(),
        1 => Class {
            every: 3,
            max_batch: None,
        },
        2 => Class {
            every: 1,
            max_batch: Some(2),
        },
        _ => Class {
            every: 2,
            max_batch: Some(3),
        },
    };
    Asked {
        class,
        history: [0, 0, 2, 50][rng.below(4) as usize],
    }
}

/// One connection, as the server's stream task and the browser see it.
struct Conn {
    sub: Subscription,
    /// The server's end of the socket, which the fan-out writes to while in step.
    viewer: Arc<chat_sync::viewer::Viewer>,
    in_step: bool,
    /// What the stream task has yet to write.
    out: Vec<u8>,
    over: bool,
    /// The browser's end.
    client: std::net::TcpStream,
    /// Bytes received that are not a whole event yet.
    partial: Vec<u8>,
}

impl Conn {
    async fn open(listener: &TcpListener, sub: Subscription, slow: bool) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        if slow {
            socket.set_recv_buffer_size(2048).unwrap();
        }
        let client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        if slow {
            socket2::SockRef::from(&server)
                .set_send_buffer_size(2048)
                .unwrap();
        }
        Self {
            sub,
            viewer: chat_sync::viewer::Viewer::new(server),
            in_step: false,
            out: Vec::new(),
            over: false,
            client: client.into_std().unwrap(),
            partial: Vec::new(),
        }
    }

    /// Does what the stream task would do now: takes the socket back from the
    /// fan-out, writes what it can, and hands the socket over once caught up.
    fn pump(&mut self, seed: u64) {
        loop {
            if self.in_step {
                let Some(handoff) = self.viewer.handed_off().now_or_never() else {
                    return;
                };
                let rest = self.sub.resume(*handoff);
                self.out.extend_from_slice(&rest);
                self.in_step = false;
            }
            if !self.out.is_empty() {
                // Straight to the socket: tokio's readiness would need the runtime
                // to run between writes, and this walk drives everything itself.
                match socket2::SockRef::from(self.viewer.socket()).send(&self.out) {
                    Ok(n) => drop(self.out.drain(..n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => panic!("seed {seed}: {e}"),
                }
                if !self.out.is_empty() {
                    return;
                }
            }
            if self.over {
                return;
            }
            match self.sub.try_next_frame() {
                Ok(Some(bytes)) => {
                    self.out.extend_from_slice(&bytes);
                    continue;
                }
                Ok(None) => {}
                Err(StreamOver) => {
                    self.over = true;
                    continue;
                }
            }
            if self.sub.go_direct(&self.viewer) {
                self.in_step = true;
                return;
            }
        }
    }

    /// Reads what arrived (at most `limit` bytes); returns the whole events in it.
    fn read(&mut self, limit: usize) -> Vec<String> {
        let mut buf = vec![0u8; limit.min(64 * 1024)];
        let mut total = 0;
        while total < limit {
            match self.client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.partial.extend_from_slice(&buf[..n]);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let Some(end) = self.partial.windows(2).rposition(|w| w == b"\n\n") else {
            return Vec::new();
        };
        let whole: Vec<u8> = self.partial.drain(..end + 2).collect();
        String::from_utf8(whole)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(String::from)
            .collect()
    }

    /// Whether everything the stream will ever send has been read.
    fn finished(&self) -> bool {
        self.over && self.out.is_empty() && self.partial.is_empty()
    }
}

/// One viewer across its connections.
struct Viewer {
    asked: Asked,
    slow: bool,
    live: Option<Conn>,
    last_event_id: Option<String>,
    /// Position, among the messages the session accepted, of the next one this viewer
    /// must receive.
    expect: u64,
    /// Set on a fresh connect that asked for history: how many messages were captured
    /// then. Its first batch either ends with the newest of them, or is live.
    recent: Option<u64>,
    received: u64,
    skipped: u64,
    /// Messages left out right before the next batch, as the last `skipped` said.
    unsent: u64,
    /// Connects that began with recent messages.
    got_history: u64,
    ended: bool,
    log: Vec<String>,
}

impl Viewer {
    /// Applies one event of the SSE stream to the viewer's expectations.
    fn absorb(&mut self, event: &str, names: &[u64], accepted: &[u64], seed: u64) {
        let mut name = "message";
        let mut data = "";
        let mut id_here = None;
        for line in event.lines() {
            if let Some(id) = line.strip_prefix("id: ") {
                self.last_event_id = Some(id.to_string());
                id_here = Position::parse(id);
            } else if let Some(n) = line.strip_prefix("event: ") {
                name = n;
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = d;
            }
        }
        if line_is_only_meta(event) {
            return;
        }
        self.log.push(format!(
            "{name} {} @{}",
            &data[..data.len().min(40)],
            self.expect
        ));
        let number = |payload: &str| -> u64 {
            payload
                .strip_prefix('m')
                .and_then(|p| p.split(':').next())
                .unwrap()
                .parse()
                .unwrap()
        };
        match name {
            "reset" => {
                // It stands after the message its id names (nothing yet, without one).
                let after = id_here.map_or(0, |p| {
                    names.iter().rposition(|&n| n == p.after).unwrap() as u64 + 1
                });
                self.expect = after;
                self.recent = None;
            }
            "skipped" => {
                let max = self.asked.class.max_batch;
                assert!(max.is_some(), "seed {seed}: skipped without max_batch");
                let n: serde_json::Value = serde_json::from_str(data).unwrap();
                let n = n["skipped"].as_u64().unwrap();
                assert!(n > 0, "seed {seed}: nothing skipped");
                // Said of the batch that follows it on this connection.
                self.unsent = n;
            }
            "message" => {
                let batch: Vec<String> = serde_json::from_str(data).unwrap();
                if let Some(captured_then) = self.recent.take() {
                    let last = number(batch.last().unwrap());
                    if captured_then > 0 && Some(&last) == accepted.get(captured_then as usize - 1)
                    {
                        assert!(
                            batch.len() <= self.asked.history,
                            "seed {seed}: more history than asked"
                        );
                        self.expect = captured_then - batch.len() as u64;
                        self.got_history += 1;
                    }
                }
                if let Some(max) = self.asked.class.max_batch {
                    assert!(
                        batch.len() <= max as usize,
                        "seed {seed}: a batch over max_batch"
                    );
                }
                self.expect += self.unsent;
                self.skipped += std::mem::take(&mut self.unsent);
                let numbers: Vec<u64> = batch.iter().map(|p| number(p)).collect();
                for payload in batch {
                    assert_eq!(
                        Some(&number(&payload)),
                        accepted.get(self.expect as usize),
                        "seed {seed}: gap, duplicate or reorder in {numbers:?} for {:?} (slow: {}), \
                         at {} of {} accepted; {:#?}",
                        self.asked,
                        self.slow,
                        self.expect,
                        accepted.len(),
                        &self.log[self.log.len().saturating_sub(12)..],
                    );
                    self.expect += 1;
                    self.received += 1;
                }
            }
            "end" => {
                assert_eq!(
                    self.expect,
                    accepted.len() as u64,
                    "seed {seed}: the end came before every message ({:?}, slow: {})",
                    self.asked,
                    self.slow
                );
                self.ended = true;
            }
            other => panic!("seed {seed}: unexpected {other} event"),
        }
    }

    /// Lets its stream task run, and reads (a slow viewer: a little, now and then).
    fn drain(&mut self, rng: &mut Rng, names: &[u64], accepted: &[u64], seed: u64) {
        let Some(conn) = self.live.as_mut() else {
            return;
        };
        conn.pump(seed);
        let limit = match self.slow {
            true if rng.below(3) == 0 => return,
            true => 2048,
            false => usize::MAX,
        };
        let events = conn.read(limit);
        conn.pump(seed);
        for event in events {
            self.absorb(&event, names, accepted, seed);
        }
        if self.live.as_ref().is_some_and(Conn::finished) {
            // Cut off for lagging too far: its browser will resume.
            self.live = None;
        }
    }

    /// Reads until its stream has nothing more to send for now.
    fn settle(&mut self, names: &[u64], accepted: &[u64], seed: u64) {
        let slow = std::mem::replace(&mut self.slow, false);
        let mut rng = Rng(1);
        for _ in 0..1000 {
            self.drain(&mut rng, names, accepted, seed);
            let quiet = self
                .live
                .as_ref()
                .is_none_or(|c| c.out.is_empty() && c.partial.is_empty() && (c.in_step || c.over));
            if quiet {
                break;
            }
        }
        self.slow = slow;
    }
}

/// `retry:` advice and heartbeat comments carry no data.
fn line_is_only_meta(event: &str) -> bool {
    event
        .lines()
        .all(|l| l.starts_with("retry: ") || l.starts_with(':'))
}

async fn walk(seed: u64) -> Walked {
    let metrics = Arc::new(Metrics::new());
    let sessions = Arc::new(Sessions::new(1 << 20, 1 << 30, metrics.clone()));
    let sink: Sink = {
        let sessions = sessions.clone();
        Arc::new(move |event| sessions.on_broker_event(event))
    };
    let broker = Broker::memory(sink);
    // Viewers fall behind the signals after 4 frames and are caught up from the
    // replay buffer. (One cut off for lagging past the buffer resumes with a position
    // the buffer lost, which waits out the resume grace: kept rare, and tested on its
    // own in `faults`.)
    let limits = Limits {
        max_connections: 1000,
        max_connections_per_session: 1000,
        max_sessions: 10,
        subscriber_buffer: 4,
        replay_batches: 400,
        replay_bytes: 1 << 20,
        session_grace: Duration::from_secs(3600),
        ended_ttl: Duration::from_secs(3600),
        client_retry: Duration::from_secs(1),
        max_streams_per_client: usize::MAX,
        new_sessions_per_client: u32::MAX,
    };
    let history = Arc::new(History::disabled(metrics.clone()));
    let registry = Arc::new(Registry::new(
        sessions,
        broker.clone(),
        history.clone(),
        limits,
        metrics.clone(),
    ));
    let captured = Arc::new(Captured::default());
    let ticker = Ticker {
        registry: registry.clone(),
        tick: Duration::from_millis(10),
        heartbeat: Duration::from_secs(3600),
        usage: captured.clone(),
        history,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let room = Uuid::new_v4();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut published = 0u64;
    // Message numbers the session accepted (a publish before the first subscriber, like
    // one to Redis, reaches no one).
    let mut accepted: Vec<u64> = Vec::new();
    // Their names (`Last-Event-ID`), as the server gives them.
    let mut names: Vec<u64> = Vec::new();
    let mut fingerprints = Fingerprinter::default();
    let mut viewers: Vec<Viewer> = Vec::new();
    let mut ticks = Ticks {
        ticker: &ticker,
        handles: Vec::new(),
        tick: 0,
    };
    let count = |c: &Captured| c.0.load(Ordering::SeqCst);
    // Long enough that a few batches fill a slow viewer's socket.
    let padding = "x".repeat(300);

    for _ in 0..1500 {
        match rng.below(100) {
            0..40 => {
                let payload = Bytes::from(format!("m{published}:{padding}"));
                if broker
                    .publish(chat_channel(room), payload.clone())
                    .await
                    .unwrap()
                    > 0
                {
                    accepted.push(published);
                    names.push(fingerprints.next(&payload));
                }
                published += 1;
            }
            40..55 => ticks.next(),
            55..62 if viewers.iter().filter(|v| v.live.is_some()).count() < 8 => {
                let asked = asked(&mut rng);
                let sub = registry.attach(room, None, LOCAL, asked).await.unwrap();
                let slow = rng.below(3) == 0;
                let mut viewer = Viewer {
                    asked,
                    slow,
                    live: Some(Conn::open(&listener, sub, slow).await),
                    last_event_id: None,
                    expect: count(&captured),
                    recent: (asked.history > 0).then(|| count(&captured)),
                    received: 0,
                    skipped: 0,
                    unsent: 0,
                    got_history: 0,
                    ended: false,
                    log: Vec::new(),
                };
                viewer.drain(&mut rng, &names, &accepted, seed);
                viewers.push(viewer);
            }
            62..68 => {
                if let Some(v) = pick(&mut rng, &mut viewers, |v| v.live.is_some()) {
                    v.live = None;
                }
            }
            68..76 => {
                if let Some(v) = pick(&mut rng, &mut viewers, |v| v.live.is_none()) {
                    if v.last_event_id.is_none() {
                        // Nothing to resume from: like any new viewer, it starts live.
                        v.expect = count(&captured);
                        v.recent = (v.asked.history > 0).then(|| count(&captured));
                    }
                    let sub = registry
                        .attach(room, v.last_event_id.as_deref(), LOCAL, v.asked)
                        .await
                        .unwrap();
                    v.live = Some(Conn::open(&listener, sub, v.slow).await);
                    v.unsent = 0;
                    v.drain(&mut rng, &names, &accepted, seed);
                }
            }
            _ => {
                if let Some(v) = pick(&mut rng, &mut viewers, |v| v.live.is_some()) {
                    v.drain(&mut rng, &names, &accepted, seed);
                }
            }
        }
    }
    let all = accepted.len() as u64;
    settle_all(&mut ticks, &mut viewers, &names, &accepted, seed, |v| {
        v.expect == all
    })
    .await;
    assert_eq!(
        count(&captured),
        accepted.len() as u64,
        "seed {seed}: every message captured once"
    );
    assert!(
        accepted.len() as u64 > published / 2,
        "seed {seed}: the session was mostly live"
    );
    for v in viewers.iter().filter(|v| v.live.is_some()) {
        assert_eq!(
            v.expect,
            accepted.len() as u64,
            "seed {seed}: a connected viewer ({:?}, slow: {}) is caught up; {}",
            v.asked,
            v.slow,
            v.live.as_ref().map_or(String::new(), |c| format!(
                "in step {} over {} out {} partial {} log {:?}",
                c.in_step,
                c.over,
                c.out.len(),
                c.partial.len(),
                &v.log[v.log.len().saturating_sub(5)..]
            ))
        );
    }
    assert!(
        viewers.iter().any(|v| v.received > 0),
        "seed {seed}: the walk delivered something"
    );

    // Half the walks end with a burst over 60 ticks that nobody reads meanwhile (far
    // more than the signals hold, and than one catch-up sends), and the session's end,
    // which every connected viewer gets after all of the burst.
    if seed % 2 == 0 {
        for _ in 0..60 {
            for _ in 0..30 {
                let payload = Bytes::from(format!("m{published}:{padding}"));
                broker
                    .publish(chat_channel(room), payload.clone())
                    .await
                    .unwrap();
                accepted.push(published);
                names.push(fingerprints.next(&payload));
                published += 1;
            }
            ticks.next();
        }
        let end = Bytes::from(format!(r#"{{"id":"{room}"}}"#));
        broker
            .publish(format!("{room}{END_SUFFIX}"), end)
            .await
            .unwrap();
        settle_all(&mut ticks, &mut viewers, &names, &accepted, seed, |v| {
            v.ended
        })
        .await;
        for v in viewers.iter().filter(|v| v.live.is_some()) {
            let c = v.live.as_ref().unwrap();
            assert!(
                v.ended,
                "seed {seed}: a connected viewer ({:?}, slow {}) got the end; in step {} over {} \
                 out {} partial {} at {} of {}; {:?}",
                v.asked,
                v.slow,
                c.in_step,
                c.over,
                c.out.len(),
                c.partial.len(),
                v.expect,
                accepted.len(),
                &v.log[v.log.len().saturating_sub(4)..]
            );
        }
    }
    Walked {
        skipped: viewers.iter().map(|v| v.skipped).sum(),
        slow_received: viewers.iter().filter(|v| v.slow).map(|v| v.received).sum(),
        catch_ups: metrics.catch_ups.get(),
        history: viewers.iter().map(|v| v.got_history).sum(),
    }
}

/// What a walk exercised, so that the test can tell it covered what it claims.
#[derive(Default, Debug)]
struct Walked {
    skipped: u64,
    slow_received: u64,
    catch_ups: u64,
    history: u64,
}

/// The walk's ticks, numbered (delivery classes count them).
struct Ticks<'a> {
    ticker: &'a Ticker,
    handles: Vec<Arc<chat_sync::session::Session>>,
    tick: u64,
}

impl Ticks<'_> {
    fn next(&mut self) {
        self.tick += 1;
        self.ticker
            .tick_once(&mut self.handles, Instant::now(), self.tick);
    }
}

/// Ticks (which deliver what the classes hold) and lets every viewer read what is in
/// its socket, until `done` holds for every connected viewer or the wait is over.
async fn settle_all(
    ticks: &mut Ticks<'_>,
    viewers: &mut [Viewer],
    names: &[u64],
    accepted: &[u64],
    seed: u64,
    done: impl Fn(&Viewer) -> bool,
) {
    let deadline = tokio::time::Instant::now() + crate::common::WAIT;
    loop {
        ticks.next();
        for v in viewers.iter_mut() {
            v.settle(names, accepted, seed);
        }
        let waiting = viewers.iter().any(|v| v.live.is_some() && !done(v));
        if !waiting || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn pick<'a>(
    rng: &mut Rng,
    viewers: &'a mut [Viewer],
    filter: impl Fn(&Viewer) -> bool,
) -> Option<&'a mut Viewer> {
    let candidates: Vec<usize> = (0..viewers.len())
        .filter(|&i| filter(&viewers[i]))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let i = candidates[rng.below(candidates.len() as u64) as usize];
    Some(&mut viewers[i])
}

#[tokio::test]
async fn random_interleavings_deliver_exactly_the_published_sequence() {
    let mut all = Walked::default();
    for seed in 1..=40 {
        let walked = walk(seed).await;
        all.skipped += walked.skipped;
        all.slow_received += walked.slow_received;
        all.catch_ups += walked.catch_ups;
        all.history += walked.history;
    }
    // The walks covered what the model claims to check.
    assert!(
        all.skipped > 0,
        "{all:?}: max_batch viewers were told of skips"
    );
    assert!(all.slow_received > 0, "{all:?}: slow viewers read");
    assert!(
        all.catch_ups > 0,
        "{all:?}: viewers that fell behind were caught up"
    );
    assert!(
        all.history > 0,
        "{all:?}: viewers began with recent messages"
    );
}
