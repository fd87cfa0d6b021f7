//! What one client can make the server hold, and what that costs everyone else: per
//! client stream caps (believing forwarded addresses only from trusted proxies),
//! session creation budgets, sessions abandoned at once, half-sent requests, and
//! connects while Redis is down.

use std::net::IpAddr;
use std::time::Instant;

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::common::{RedisServer, TestApp, WAIT, sse_path, wait_until};

/// A stream request from source address `from`, with extra headers; the response is
/// kept open by the caller for as long as it wants the stream held.
async fn open(
    app: &TestApp,
    from: &str,
    room: Uuid,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut request = client.get(app.url(&sse_path(room)));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    tokio::time::timeout(WAIT, request.send())
        .await
        .expect("an answer")
        .unwrap()
}

async fn refused_as_too_many(response: reqwest::Response) {
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "TOO_MANY_REQUESTS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_stream_slot() {
    let app = TestApp::spawn(
        None,
        &[("MAX_STREAMS_PER_CLIENT", "3"), ("TRUSTED_PROXIES", "none")],
    )
    .await;
    let room = Uuid::new_v4();
    let mut held = Vec::new();
    for _ in 0..3 {
        let r = open(&app, "127.0.0.1", room, &[]).await;
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    refused_as_too_many(open(&app, "127.0.0.1", room, &[]).await).await;
    // Another address is not affected, and a slot freed is a slot back.
    assert_eq!(open(&app, "127.0.0.2", room, &[]).await.status(), 200);
    drop(held.pop());
    wait_until("the slot is released", || async {
        open(&app, "127.0.0.1", room, &[]).await.status() == 200
    })
    .await;
    assert_eq!(
        app.metric(r#"chat_sync_connections_rejected_total{reason="max_streams_per_client"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let app = TestApp::spawn(
        None,
        &[
            ("MAX_STREAMS_PER_CLIENT", "2"),
            ("TRUSTED_PROXIES", "127.0.0.1/32"),
        ],
    )
    .await;
    let room = Uuid::new_v4();
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    let mut held = Vec::new();
    // Through the trusted proxy (127.0.0.1) each viewer is its forwarded address.
    for _ in 0..2 {
        held.push(open(&app, "127.0.0.1", room, &xff("198.51.100.1")).await);
    }
    assert!(held.iter().all(|r| r.status() == 200));
    refused_as_too_many(open(&app, "127.0.0.1", room, &xff("198.51.100.1")).await).await;
    held.push(open(&app, "127.0.0.1", room, &xff("198.51.100.2")).await);
    assert_eq!(
        held.last().unwrap().status(),
        200,
        "another viewer behind the proxy"
    );
    // A client that is not a trusted proxy cannot pick its address: its headers are
    // ignored and it counts as itself.
    for ip in ["203.0.113.1", "203.0.113.2"] {
        held.push(open(&app, "127.0.0.2", room, &xff(ip)).await);
        assert_eq!(held.last().unwrap().status(), 200);
    }
    refused_as_too_many(open(&app, "127.0.0.2", room, &xff("203.0.113.3")).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_close_churn_cannot_fill_the_session_table() {
    let app = TestApp::spawn(
        None,
        &[
            ("MAX_SESSIONS", "21"),
            ("SESSION_GRACE_MS", "3600000"),
            ("NEW_SESSIONS_PER_CLIENT", "1000"),
        ],
    )
    .await;
    // A real session delivers something, then its viewer leaves: it keeps the
    // grace period.
    let kept = Uuid::new_v4();
    let mut viewer = app.connect(kept).await;
    let path = format!("/api/v1/chats/{kept}/messages");
    assert_eq!(app.post(&path, r#"{"id":"p"}"#).await.status(), 202);
    viewer.messages(1).await;
    drop(viewer);
    // 100 sessions opened and closed at once, five times the table's size.
    for _ in 0..5 {
        let churn = join_all((0..20).map(|_| app.connect(Uuid::new_v4()))).await;
        assert!(
            churn.iter().all(|v| v.status == 200),
            "room was made each time"
        );
        drop(churn);
        wait_until("abandoned sessions are freed", || async {
            app.ready_field("sessions").await == 1
        })
        .await;
    }
    assert_eq!(app.connect(Uuid::new_v4()).await.status, 200);
    assert_eq!(
        app.connect(kept).await.status,
        200,
        "the kept session is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_are_rate_limited_per_client() {
    const RATE: f64 = 2.0;
    let app = TestApp::spawn(None, &[("NEW_SESSIONS_PER_CLIENT", "2")]).await;
    let started = Instant::now();
    let mut admitted = 0.0;
    let mut held = Vec::new();
    for _ in 0..40 {
        let r = open(&app, "127.0.0.1", Uuid::new_v4(), &[]).await;
        if r.status() == 200 {
            admitted += 1.0;
            held.push(r);
        } else {
            refused_as_too_many(r).await;
        }
    }
    // A burst of ten times the rate, then the rate; however long this took.
    let allowed = RATE * 10.0 + started.elapsed().as_secs_f64() * RATE + 1.0;
    assert!(admitted >= RATE * 10.0, "{admitted}: the burst is allowed");
    assert!(
        admitted <= allowed,
        "{admitted} admitted, {allowed} allowed"
    );
    // Other addresses have their own budget; existing sessions are not limited.
    assert_eq!(
        open(&app, "127.0.0.2", Uuid::new_v4(), &[]).await.status(),
        200
    );
    let existing = held[0]
        .url()
        .path()
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(open(&app, "127.0.0.1", existing, &[]).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_while_redis_is_down_are_answered_at_once() {
    let mut redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let watched = Uuid::new_v4();
    let mut viewer = app.connect(watched).await;
    redis.kill();
    wait_until("/readyz reports the broker down", || async {
        app.get("/readyz").await.status() == 503
    })
    .await;
    // Twenty new sessions at once: each gets its 503 now, none waits for Redis (one
    // after the other, they used to wait five seconds each).
    let paths: Vec<String> = (0..20).map(|_| sse_path(Uuid::new_v4())).collect();
    let refused = join_all(paths.iter().map(|p| tokio::time::timeout(WAIT, app.get(p)))).await;
    for r in refused {
        let r = r.expect("answered, not left waiting");
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
    }
    redis.restart().await;
    app.wait_ready().await;
    assert_eq!(app.connect(Uuid::new_v4()).await.status, 200);
    redis.publish(&watched.to_string(), "after").await;
    loop {
        let event = viewer.next_event().await.expect("the stream stayed open");
        if event.event == "message" {
            assert_eq!(crate::common::batch(&event), vec!["after".to_string()]);
            break;
        }
    }
}

/// A raw connection that sends `bytes` and then nothing.
async fn half_sent(app: &TestApp, bytes: &[u8]) -> tokio::net::TcpStream {
    let addr = app.base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp
}

/// Whether the server closes `tcp` (reads reach the end) within the harness's wait.
async fn closed_by_server(mut tcp: tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_let_go_as_soon_as_the_client_closes() {
    // A header timeout far beyond the test: only noticing the close can free them.
    let app = TestApp::spawn(None, &[("HEADER_TIMEOUT_MS", "600000")]).await;
    let held = join_all((0..100).map(|_| half_sent(&app, b"G"))).await;
    wait_until("all 100 are pending", || async {
        app.ready_field("pendingConnections").await == 100
    })
    .await;
    drop(held);
    wait_until("the server let them all go", || async {
        app.ready_field("pendingConnections").await == 0
    })
    .await;
    // A prefix of the stream path, then a close: the same.
    let held = join_all((0..20).map(|_| half_sent(&app, b"GET /api/v1/chats/sse-"))).await;
    drop(held);
    wait_until("the server let those go too", || async {
        app.ready_field("pendingConnections").await == 0
    })
    .await;
}

/// A stream's client has nothing to send after its request; one that sends anyway (a
/// megabyte of it) keeps its stream, costs the server what it reads, and is let go
/// when it closes, its stream slot given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_client_that_sends_data_keeps_its_stream_and_is_let_go_on_close() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
        sse_path(room)
    );
    let mut tcp = half_sent(&app, request.as_bytes()).await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("retry:") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream opened");
        seen.extend_from_slice(&buf[..n]);
    }
    let junk = vec![b'x'; 64 * 1024];
    for _ in 0..16 {
        tcp.write_all(&junk).await.unwrap();
    }
    redis
        .publish(&room.to_string(), &crate::common::chat("a", 0))
        .await;
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&seen).contains("data: ") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream stays open");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the message arrives");
    assert_eq!(app.metric("chat_sync_connections").await, 1.0);
    drop(tcp);
    wait_until("its stream slot is given back", || async {
        app.metric("chat_sync_connections").await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_header_timeout_closes_a_stalled_request_on_either_path() {
    let app = TestApp::spawn(None, &[("HEADER_TIMEOUT_MS", "300")]).await;
    let stream = half_sent(&app, b"GET /api/v1/chats/sse-connect/").await;
    let other = half_sent(&app, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    let silent = half_sent(&app, b"").await;
    assert!(closed_by_server(stream).await, "the stream path");
    assert!(closed_by_server(other).await, "hyper's path");
    assert!(
        closed_by_server(silent).await,
        "a connection that says nothing"
    );
    // Its socket and its place in the table go in the same instant, not in one step.
    wait_until("none of them is pending", || async {
        app.ready_field("pendingConnections").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_connections_are_bounded_and_health_checks_still_answer() {
    let app = TestApp::spawn(
        None,
        &[
            ("MAX_PENDING_CONNECTIONS", "10"),
            ("HEADER_TIMEOUT_MS", "600000"),
        ],
    )
    .await;
    let _held = join_all((0..50).map(|_| half_sent(&app, b"GET /api/v1/"))).await;
    wait_until("the oldest made room for the newest", || async {
        app.metric("chat_sync_pending_connections_evicted_total")
            .await
            >= 40.0
    })
    .await;
    assert!(app.metric("chat_sync_pending_connections").await <= 10.0);
    assert_eq!(app.get("/healthz").await.status(), 200);
    let viewer = app.connect(Uuid::new_v4()).await;
    assert_eq!(viewer.status, 200, "viewers get in too");
}

/// xorshift64*: seeded, so a failure names the case.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_hostile_request_heads_get_an_answer_and_hurt_no_one() {
    let app = TestApp::spawn(None, &[("HEADER_TIMEOUT_MS", "2000")]).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    let mut rng = 0x5eed_u64;
    for case in 0..300 {
        let mut junk: Vec<u8> = (0..next(&mut rng) % 300)
            .map(|_| next(&mut rng) as u8)
            .collect();
        let head: Vec<u8> = match case % 5 {
            0 => junk,
            1 => {
                let mut h = b"GET /api/v1/chats/sse-connect/".to_vec();
                h.append(&mut junk);
                h.extend_from_slice(b" HTTP/1.1\r\n\r\n");
                h
            }
            2 => {
                let mut h =
                    format!("GET {} HTTP/1.1\r\nLast-Event-ID: ", sse_path(room)).into_bytes();
                h.append(&mut junk);
                h.extend_from_slice(b"\r\n\r\n");
                h
            }
            3 => format!(
                "GET {} HTTP/1.1\r\nX: {}\r\n\r\n",
                sse_path(room),
                "a".repeat(20_000)
            )
            .into_bytes(),
            _ => {
                let mut h = format!("POST /api/v1/chats/{room}/messages HTTP/1.1\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n", junk.len()).into_bytes();
                h.append(&mut junk);
                h
            }
        };
        let mut tcp = half_sent(&app, &head).await;
        let _ = tcp.shutdown().await;
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("case {case}: no answer and no close"))
            .ok();
        if !answer.is_empty() {
            let status = std::str::from_utf8(&answer[..answer.len().min(12)]).unwrap_or("");
            assert!(status.starts_with("HTTP/1.1 "), "case {case}: {status:?}");
            assert!(!status.starts_with("HTTP/1.1 5"), "case {case}: {status:?}");
        }
    }
    // The server is unharmed and the viewer was not disturbed.
    assert_eq!(app.get("/healthz").await.status(), 200);
    let path = format!("/api/v1/chats/{room}/messages");
    assert_eq!(app.post(&path, r#"{"after":"fuzz"}"#).await.status(), 202);
    let got = viewer.messages(1).await;
    assert_eq!(got, vec![r#"{"after":"fuzz"}"#.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_limits_below_the_file_limit_health_checks_answer_under_a_flood() {
    // 128 descriptors in all; the limits below leave room for the server's own.
    let vars = [("MAX_PENDING_CONNECTIONS", "16"), ("MAX_CONNECTIONS", "16")];
    let server = crate::common::ServerProcess::spawn_with_file_limit(Some(128), &vars).await;
    let addr = server.addr();
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await {
            let _ = tcp.write_all(b"GET /api/v1/").await;
            held.push(tcp);
        }
    }
    let health = tokio::time::timeout(WAIT, crate::common::get(server.url("/healthz")))
        .await
        .expect("an answer, not a hang");
    assert_eq!(health.unwrap().status(), 200);
    assert!(server.metric("chat_sync_pending_connections").await <= 16.0);
    let evicted = server
        .metric("chat_sync_pending_connections_evicted_total")
        .await;
    assert!(evicted >= 250.0, "{evicted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_server_turns_clients_away_and_recovers() {
    // Limits far above the 64 descriptors it has: accepts fail with EMFILE.
    let server = crate::common::ServerProcess::spawn_with_file_limit(Some(64), &[]).await;
    let addr = server.addr();
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await {
            let _ = tcp.write_all(b"GET /api/v1/").await;
            held.push(tcp);
        }
    }
    // Waiting clients are turned away (closed), not left hanging in the backlog.
    let last = held.pop().unwrap();
    assert!(
        closed_by_server(last).await,
        "a client beyond the limit is closed"
    );
    drop(held);
    wait_until("the server answers again", || async {
        crate::common::get(server.url("/healthz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(server.metric("chat_sync_accept_errors_total").await >= 1.0);
}
