//! The bad day: Redis restarts, clients that vanish and come back, clients that stop
//! reading, limits, and shutdown.

use std::time::Duration;

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::common::{
    RedisServer, ServerProcess, Subscriber, TestApp, WAIT, batch, chat, redis_conn, sse_path,
    wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_resumes_delivery_on_open_streams() {
    let mut redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    redis.publish(&room.to_string(), &chat("p1", 0)).await;
    assert_eq!(viewer.messages(1).await, vec![chat("p1", 0)]);

    redis.kill();
    wait_until("/readyz reports the broker down", || async {
        app.get("/readyz").await.status() == 503
    })
    .await;
    redis.restart().await;
    let back = std::time::Instant::now();
    wait_until("/readyz is ready again", || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    wait_until("the session is subscribed again", || async {
        redis.numsub(&room.to_string()).await == 1
    })
    .await;
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "took {:?}",
        back.elapsed()
    );

    redis.publish(&room.to_string(), &chat("p1", 1)).await;
    let mut saw_reset = false;
    loop {
        let event = viewer.next_event().await.expect("the stream stayed open");
        match event.event.as_str() {
            "reset" => saw_reset = true,
            "message" => {
                assert_eq!(batch(&event), vec![chat("p1", 1)]);
                break;
            }
            other => panic!("unexpected {other} event"),
        }
    }
    assert!(
        saw_reset,
        "viewers are told that messages during the outage are lost"
    );
    assert!(app.metric("chat_sync_broker_disconnects_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_last_event_id_gets_exactly_what_was_missed() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("TICK_MS", "5"), ("REPLAY_BATCHES", "30")]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut watcher = app.connect(room).await;
    let mut viewer = app.connect(room).await;
    for i in 0..10 {
        redis.publish(&room.to_string(), &chat("p1", i)).await;
    }
    assert_eq!(viewer.messages(10).await.len(), 10);
    watcher.messages(10).await;
    let last = viewer.last_event_id.clone().expect("batches carry ids");
    drop(viewer);

    // Published while the viewer was away, in several batches.
    for i in 10..30 {
        redis.publish(&room.to_string(), &chat("p1", i)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    watcher.messages(20).await;
    let mut back = Subscriber::connect(&url, Some(&last)).await;
    let expected: Vec<String> = (10..30).map(|i| chat("p1", i)).collect();
    assert_eq!(
        back.messages(20).await,
        expected,
        "the missed messages, once, in order"
    );
    redis.publish(&room.to_string(), &chat("p1", 30)).await;
    assert_eq!(
        back.messages(1).await,
        vec![chat("p1", 30)],
        "then the live stream, no gap"
    );

    // An id older than the replay buffer: the client is told, then continues live.
    for i in 31..100 {
        redis.publish(&room.to_string(), &chat("p1", i)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    watcher.messages(70).await;
    let mut stale = Subscriber::connect(&url, Some(&last)).await;
    let reset = stale.next_event().await.unwrap();
    assert_eq!(reset.event, "reset");
    redis.publish(&room.to_string(), &chat("p1", 100)).await;
    assert_eq!(stale.messages(1).await, vec![chat("p1", 100)]);

    // An id from another instance or boot is never mistaken for ours.
    let mut foreign = Subscriber::connect(&url, Some("00000000deadbeef-3")).await;
    assert_eq!(foreign.next_event().await.unwrap().event, "reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_retry_advice_keep_idle_streams_alive() {
    let app = TestApp::spawn(
        None,
        &[("HEARTBEAT_MS", "150"), ("CLIENT_RETRY_MS", "1500")],
    )
    .await;
    let response = app.get(&sse_path(Uuid::new_v4())).await;
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    tokio::time::timeout(WAIT, async {
        while seen.matches(":\n\n").count() < 2 {
            let chunk = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .expect("heartbeats on an idle stream");
    assert!(seen.starts_with("retry: 1500\n\n"), "{seen:?}");
}

/// Reads a process's resident memory from /proc, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_stops_reading_is_dropped_without_hurting_the_others() {
    const MESSAGES: usize = 20_000;
    let redis = RedisServer::start().await;
    let server = ServerProcess::spawn(&[
        ("REDIS_URL", &redis.url()),
        ("SLOW_CLIENT_TIMEOUT_MS", "3000"),
        ("SUBSCRIBER_BUFFER", "64"),
        ("REPLAY_BYTES", "1048576"),
    ])
    .await;
    let room = Uuid::new_v4();
    let mut healthy = Subscriber::connect(&server.url(&sse_path(room)), None).await;

    // A client with a tiny receive buffer that reads the headers, then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server.addr()).await.unwrap();
    let request = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", sse_path(room));
    stalled.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 256];
    let n = stalled.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));

    let rss_before = rss_kib(server.pid());
    fn payload(i: usize) -> String {
        format!(r#"{{"id":"p1","seq":{i},"message":"{}"}}"#, "x".repeat(900))
    }
    let publisher = {
        let url = redis.url();
        tokio::spawn(async move {
            let mut conn = redis_conn(&url).await;
            for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(200) {
                let mut pipe = redis::pipe();
                for &i in chunk {
                    pipe.publish(room.to_string(), payload(i)).ignore();
                }
                pipe.query_async::<()>(&mut conn).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let received = healthy.messages(MESSAGES).await;
    publisher.await.unwrap();
    assert!(
        received.iter().enumerate().all(|(i, m)| *m == payload(i)),
        "the healthy viewer got everything, in order"
    );
    let grown_kib = rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(
        grown_kib < 24 * 1024,
        "RSS grew by {grown_kib} KiB while {} MiB flowed past a stalled viewer",
        MESSAGES * 950 / (1 << 20)
    );

    // The server cuts the stalled viewer by itself (reading its socket first would
    // unstall it)...
    let metric = |name: &'static str| {
        let url = server.url("/metrics");
        async move {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            crate::common::parse_metrics(&text)[name]
        }
    };
    wait_until("the stalled viewer is disconnected", || async {
        metric("chat_sync_connections").await == 1.0
    })
    .await;
    assert!(metric("chat_sync_slow_subscribers_dropped_total").await >= 1.0);
    // ...and draining its socket then reaches the end.
    let drained = tokio::time::timeout(WAIT, async {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the server closed the stalled connection");
    assert!(
        drained < MESSAGES * 950,
        "it was cut off, not fed everything ({drained} bytes)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_503_with_retry_after() {
    let app = TestApp::spawn(
        None,
        &[
            ("MAX_CONNECTIONS", "4"),
            ("MAX_CONNECTIONS_PER_SESSION", "2"),
            ("MAX_SESSIONS", "2"),
        ],
    )
    .await;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let on_a = join_all((0..2).map(|_| app.connect(a))).await;
    assert!(on_a.iter().all(|s| s.status == 200));
    let refused = app.get(&sse_path(a)).await;
    assert_eq!(refused.status(), 503, "per-session limit");
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "SERVICE_UNAVAILABLE");

    let on_b = join_all((0..2).map(|_| app.connect(b))).await;
    assert!(on_b.iter().all(|s| s.status == 200));
    assert_eq!(
        app.get(&sse_path(c)).await.status(),
        503,
        "instance connection limit"
    );
    drop(on_b);
    wait_until("b's connections are released", || async {
        app.ready_field("connections").await == 2
    })
    .await;
    assert_eq!(
        app.get(&sse_path(c)).await.status(),
        503,
        "session limit: b is still in its grace period"
    );
    let mut again = app.connect(b).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        app.post(&format!("/api/v1/chats/{b}/messages"), &chat("p", 1))
            .await
            .status(),
        202
    );
    assert_eq!(
        again.messages(1).await,
        vec![chat("p", 1)],
        "refusals hurt nobody"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_answer_204_until_the_ttl_passes() {
    let app = TestApp::spawn(None, &[("ENDED_SESSION_TTL_MS", "400")]).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    assert_eq!(
        app.post(&format!("/api/v1/chats/{room}/end"), "")
            .await
            .status(),
        202
    );
    assert_eq!(viewer.next_event().await.unwrap().event, "end");
    assert_eq!(app.get(&sse_path(room)).await.status(), 204);
    wait_until("the session id can be used again", || async {
        app.get(&sse_path(room)).await.status() == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_redis_payloads_are_dropped_and_counted() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("MAX_MESSAGE_BYTES", "1024")]).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    redis.publish(&room.to_string(), &"y".repeat(1025)).await;
    redis.publish(&room.to_string(), &chat("p1", 1)).await;
    assert_eq!(viewer.messages(1).await, vec![chat("p1", 1)]);
    assert_eq!(
        app.metric(r#"chat_sync_messages_dropped_total{reason="oversize"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric("chat_sync_usage_captured_total").await,
        1.0,
        "dropped payloads are not billed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_stream_and_exits_within_the_drain_time() {
    let redis = RedisServer::start().await;
    let mut server =
        ServerProcess::spawn(&[("REDIS_URL", &redis.url()), ("SHUTDOWN_TIMEOUT_MS", "3000")]).await;
    let rooms: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let urls: Vec<String> = (0..100)
        .map(|i| server.url(&sse_path(rooms[i % 10])))
        .collect();
    let mut viewers = join_all(urls.iter().map(|u| Subscriber::connect(u, None))).await;
    assert!(viewers.iter().all(|v| v.status == 200));

    server.terminate();
    let (code, took) = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(4), "exited after {took:?}");
    for viewer in &mut viewers {
        let event = viewer.next_event().await.expect("a shutdown event");
        assert_eq!(event.event, "shutdown");
        assert!(viewer.next_event().await.is_none(), "then the stream ends");
    }
}
