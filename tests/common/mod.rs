//! The shared test harness: a real `redis-server` per test on a free loopback port,
//! the real server started through `Application` on an ephemeral port, and an SSE
//! client that speaks to it over real HTTP, and a stand-in tenant backend.

#![allow(dead_code)]

pub mod cluster;
pub mod fleet;
pub mod nginx;
mod process;
mod redis_server;
pub mod sentinel;
pub mod show;
pub mod sse;
pub mod tenant;

pub use process::ServerProcess;
pub use redis_server::RedisServer;

pub use sse::Event;
use sse::SseReader;

use std::collections::HashMap;
use std::net::TcpListener;
use std::time::Duration;

use chat_sync::{Application, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Generous bound for anything the tests wait on; conditions end the wait, not time.
/// Only a test that is failing anyway waits this long, so it is set for a debug build
/// on a busy two-core machine, not for a fast one.
pub const WAIT: Duration = Duration::from_secs(30);

/// A connection to a test Redis by URL, for tasks that cannot borrow the server.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    try_conn(url)
        .await
        .unwrap_or_else(|| panic!("no connection to {url}"))
}

/// A connection to a Redis node that may be down or still coming up: `None` then.
pub async fn try_conn(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection_with_config(&patient())
        .await
        .ok()
}

/// One HTTP client for all viewers of a test process: building one costs tens of
/// milliseconds of CPU in a debug build (TLS roots), and hundreds of viewers building
/// theirs in one task starved the others past their deadline on a busy machine.
pub fn http_client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    // No idle pool: each test has its own runtime, and a pooled connection would
    // belong to the runtime of the test that opened it.
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap()
        })
        .clone()
}

/// One sample of the `/metrics` of the server at `base` (0 for a series not there yet).
pub async fn metric_at(base: &str, series: &str) -> f64 {
    let text = get(format!("{base}/metrics")).await.unwrap().text().await;
    parse_metrics(&text.unwrap())
        .get(series)
        .copied()
        .unwrap_or(0.0)
}

/// `GET url` with the shared client.
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    http_client().get(url).send().await
}

/// No response timeout: the crate's default (500 ms) fails commands on a busy machine,
/// and a PUBLISH that timed out may still have been published, so a retry would send
/// it twice. The tests' own waits bound everything instead.
pub fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(None)
}

/// A free loopback port for a server a test starts, and may start again on it.
///
/// It is taken below the kernel's ephemeral range, because these ports are bound again
/// later (a restarted Redis or instance, an nginx upstream): a port from that range,
/// once let go, can become the local end of any test's outgoing connection, which
/// then holds it for as long as that connection lives, and the restart cannot bind.
/// Calls in one test process never return the same port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let below = ephemeral_start().max(LOWEST + 1_000);
    let span = below - LOWEST;
    // Test processes running at once start at different places.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = (LOWEST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// The first port the kernel hands out for outgoing connections.
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The real server, in this process, on an ephemeral port.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    /// Starts the server on `redis` (or the in-process broker) with extra variables.
    pub async fn spawn(redis: Option<&RedisServer>, vars: &[(&str, &str)]) -> Self {
        let mut env: HashMap<String, String> = HashMap::from([
            ("BIND_ADDR".into(), "127.0.0.1".into()),
            ("PORT".into(), "0".into()),
            ("TICK_MS".into(), "10".into()),
        ]);
        if let Some(redis) = redis {
            env.insert("REDIS_URL".into(), redis.url());
        }
        for (k, v) in vars {
            env.insert(k.to_string(), v.to_string());
        }
        let config = Config::from_lookup(|k| env.get(k).cloned()).expect("test config");
        let app = Application::build(config).await.expect("app builds");
        let base = format!("http://{}", app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let app = Self {
            base,
            http: http_client(),
            stop: Some(stop),
            handle: Some(handle),
        };
        if redis.is_some() {
            app.wait_ready().await;
        }
        app
    }

    pub async fn wait_ready(&self) {
        wait_until("the server is ready", || async {
            self.get("/readyz").await.status() == 200
        })
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// A number from `/readyz` (sessions, connections).
    pub async fn ready_field(&self, field: &str) -> u64 {
        let body: serde_json::Value = self.get("/readyz").await.json().await.unwrap();
        body[field].as_u64().unwrap()
    }

    /// All samples of `/metrics`, by series (name with labels), e.g.
    /// `chat_sync_billing_requests_total{outcome="accepted"}`.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        let response = self.get("/metrics").await;
        assert_eq!(response.status(), 200);
        parse_metrics(&response.text().await.unwrap())
    }

    /// One sample; a labelled series not yet incremented reads 0, but a metric the
    /// server does not expose at all is a test bug and panics.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        let name = series.split('{').next().unwrap();
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "/metrics has no {family}"
        );
        parse_metrics(&text).get(series).copied().unwrap_or(0.0)
    }

    pub async fn connect(&self, session: Uuid) -> Subscriber {
        Subscriber::connect(&self.url(&sse_path(session)), None).await
    }

    /// Until exactly `n` viewers are in step: the fan-out writes to them itself.
    pub async fn wait_in_step(&self, n: usize) {
        wait_until(&format!("{n} viewers are in step"), || async {
            self.metric("chat_sync_viewers_in_step").await == n as f64
        })
        .await;
    }

    /// A viewer of `session` that reads slowly on purpose: a raw connection with a 4 KiB
    /// receive buffer, which the test reads when it likes. `headers`: more request lines.
    pub async fn slow_viewer(&self, session: Uuid, headers: &str) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let addr: std::net::SocketAddr = self.base.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        let path = sse_path(session);
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        stream
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// Parses the text exposition format strictly enough to catch a malformed line.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample is `series value`");
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

pub fn sse_path(session: Uuid) -> String {
    format!("/api/v1/chats/sse-connect/{session}")
}

/// One viewer's EventSource-like connection.
pub struct Subscriber {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    events: SseReader,
    /// The id of the last event received, as a browser keeps it.
    pub last_event_id: Option<String>,
    /// Number of batch (unnamed) events received.
    pub batches: usize,
}

impl Subscriber {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> Self {
        Self::try_connect(url, last_event_id)
            .await
            .expect("connect")
    }

    /// As [`Subscriber::connect`], but a refused or failed connect is an error (for
    /// viewers of an instance that may be down).
    pub async fn try_connect(url: &str, last_event_id: Option<&str>) -> reqwest::Result<Self> {
        Self::try_connect_with(url, last_event_id, &[]).await
    }

    /// As a browser does: asks for gzip (its stream is then decoded as it arrives).
    pub async fn connect_gzip(url: &str, last_event_id: Option<&str>) -> Self {
        Self::try_connect_with(
            url,
            last_event_id,
            &[("accept-encoding", "gzip, deflate, br")],
        )
        .await
        .expect("connect")
    }

    pub async fn try_connect_with(
        url: &str,
        last_event_id: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Result<Self> {
        let mut request = http_client().get(url);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("no response head within the wait")?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let events = SseReader::new(response);
        Ok(Self {
            status,
            headers,
            events,
            last_event_id: last_event_id.map(String::from),
            batches: 0,
        })
    }

    /// For a gzip stream: everything received so far, checked whole by a strict
    /// decoder (its trailer too, once the stream ended).
    pub fn gzip_whole(&self) -> Option<Result<Vec<u8>, std::io::Error>> {
        self.events.gunzip.as_ref().map(|g| g.whole())
    }

    /// For a gzip stream: how many bytes came on the wire.
    pub fn gzip_wire_len(&self) -> Option<usize> {
        self.events.gunzip.as_ref().map(|g| g.wire.len())
    }

    /// The next event, `None` when the stream closed. Panics after [`WAIT`].
    pub async fn next_event(&mut self) -> Option<Event> {
        self.next_event_within(WAIT)
            .await
            .expect("no event within the wait")
    }

    /// The next event within `limit`: `None` if none came in time, `Some(None)` when
    /// the stream closed. Only for checking that something does *not* arrive; what
    /// must arrive is awaited with [`Subscriber::next_event`].
    pub async fn next_event_within(&mut self, limit: Duration) -> Option<Option<Event>> {
        let next = tokio::time::timeout(limit, self.events.next()).await.ok()?;
        Some(self.absorb(next))
    }

    fn absorb(&mut self, next: Option<Result<Event, String>>) -> Option<Event> {
        // A connection cut mid-body (the server stopped or was killed) ends the stream
        // like a close; the tests judge what arrived before it.
        let event = next?.ok()?;
        if !event.id.is_empty() {
            self.last_event_id = Some(event.id.clone());
        }
        Some(event)
    }

    /// Reads batches until `n` chat payloads arrived; returns them in order. Panics on
    /// any named event in between.
    pub async fn messages(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let event = self
                .next_event()
                .await
                .unwrap_or_else(|| panic!("stream closed after {} of {n} messages", out.len()));
            assert!(
                event.event == "message",
                "unexpected {} event after {} of {n} messages",
                event.event,
                out.len()
            );
            out.extend(batch(&event));
            self.batches += 1;
        }
        out
    }
}

/// The payloads of a batch event (a JSON array of strings, as the original sent).
pub fn batch(event: &Event) -> Vec<String> {
    serde_json::from_str(&event.data).expect("batch data is a JSON array of strings")
}

/// A chat message as the tenant backend publishes it, numbered for order checks.
pub fn chat(sender: &str, seq: usize) -> String {
    serde_json::json!({
        "id": sender,
        "nickname": format!("viewer {sender}"),
        "profileImgUrl": "https://cdn.example.com/p.png",
        "message": format!("hello {seq}"),
        "createdAt": "2026-11-24T10:15:30.123",
        "seq": seq,
    })
    .to_string()
}

/// The `seq` of a chat payload produced by [`chat`].
pub fn seq_of(payload: &str) -> (String, usize) {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["seq"].as_u64().unwrap() as usize,
    )
}

/// Waits until an instance (read through `metric`, one `/metrics` series) has nothing
/// pending for the tenant and has completed two more report rounds since: a count
/// reported twice would have been sent by then.
pub async fn wait_billing_settled<F, Fut>(metric: F)
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = f64>,
{
    wait_until("nothing is pending", || async {
        metric("chat_sync_billing_pending").await == 0.0
    })
    .await;
    let rounds = metric("chat_sync_billing_flushes_total").await;
    wait_until("two more report rounds", || async {
        metric("chat_sync_billing_flushes_total").await >= rounds + 2.0
    })
    .await;
}

/// A slow reader's read: at most 2 KiB of what has arrived, if any comes within a
/// moment. It paces the reader; no assertion depends on how much it got.
pub async fn read_a_little(stream: &mut tokio::net::TcpStream, into: &mut Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 2048];
    if let Ok(Ok(got)) =
        tokio::time::timeout(Duration::from_millis(1), stream.read(&mut chunk)).await
    {
        into.extend_from_slice(&chunk[..got]);
    }
}

/// Polls `condition` until it holds; panics with `what` after [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
