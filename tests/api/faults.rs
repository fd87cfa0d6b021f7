//! The bad day: Redis restarts, clients that vanish and come back, clients that stop
//! reading, limits, and shutdown.

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::common::{
    RedisServer, ServerProcess, Subscriber, TestApp, WAIT, batch, chat, sse_path, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_resumes_delivery_and_marks_the_gap_where_it_is() {
    let mut redis = RedisServer::start().await;
    // A long tick, so that the messages received before the outage and the outage
    // itself usually fall into one capture: the reset must still come after them.
    let app = TestApp::spawn(Some(&redis), &[("TICK_MS", "1000")]).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    for i in 0..5 {
        redis.publish(&room.to_string(), &chat("p1", i)).await;
    }
    wait_until("the server received them", || async {
        app.metric("chat_sync_messages_received_total").await == 5.0
    })
    .await;

    redis.kill();
    wait_until("/readyz reports the broker down", || async {
        app.get("/readyz").await.status() == 503
    })
    .await;
    redis.restart().await;
    wait_until("/readyz is ready again", || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    wait_until("the session is subscribed again", || async {
        redis.numsub(&room.to_string()).await == 1
    })
    .await;
    for i in 5..10 {
        redis.publish(&room.to_string(), &chat("p1", i)).await;
    }

    let (mut before, mut after, mut resets) = (Vec::new(), Vec::new(), 0);
    while after.len() < 5 {
        let event = viewer.next_event().await.expect("the stream stayed open");
        match event.event.as_str() {
            "reset" => resets += 1,
            "message" if resets == 0 => before.extend(batch(&event)),
            "message" => after.extend(batch(&event)),
            other => panic!("unexpected {other} event"),
        }
    }
    let expected = |r: std::ops::Range<usize>| r.map(|i| chat("p1", i)).collect::<Vec<_>>();
    assert_eq!(
        before,
        expected(0..5),
        "what arrived before the outage comes first"
    );
    assert_eq!(resets, 1, "then one reset marks the outage");
    assert_eq!(
        after,
        expected(5..10),
        "then what arrived once Redis was back"
    );
    assert!(app.metric("chat_sync_broker_disconnects_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_last_event_id_gets_exactly_what_was_missed() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(
        Some(&redis),
        &[
            ("TICK_MS", "5"),
            ("REPLAY_BATCHES", "30"),
            ("SUBSCRIBER_BUFFER", "30"),
        ],
    )
    .await;
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

    // Published while the viewer was away, one batch each (the watcher paces it):
    // 20 batches, within the 30 the buffer keeps.
    for i in 10..30 {
        redis.publish(&room.to_string(), &chat("p1", i)).await;
        watcher.messages(1).await;
    }
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

    // An id older than the replay buffer (69 more batches): the client is told, then
    // continues live.
    watcher.messages(1).await;
    for i in 31..100 {
        redis.publish(&room.to_string(), &chat("p1", i)).await;
        watcher.messages(1).await;
    }
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
/// A ~950-byte chat payload numbered `i`.
fn big_payload(i: usize) -> String {
    format!(r#"{{"id":"p1","seq":{i},"message":"{}"}}"#, "x".repeat(900))
}
const BIG_PAYLOAD_BYTES: usize = 950;

/// A client with a tiny receive buffer that reads the response head, then nothing.
async fn stalled_viewer(server: std::net::SocketAddr, room: Uuid) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server).await.unwrap();
    let request = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", sse_path(room));
    stalled.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 256];
    let n = stalled.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    stalled
}

/// Publishes `range` as `payload(i)`, `chunk` at a time, each chunk once the healthy
/// viewer has received the one before, in order. Paced by the viewer rather than by
/// time, so frames are small and their number grows with the data on any machine.
async fn publish_in_step(
    conn: &mut redis::aio::MultiplexedConnection,
    room: Uuid,
    healthy: &mut Subscriber,
    range: std::ops::Range<usize>,
    chunk: usize,
    payload: fn(usize) -> String,
) {
    for chunk in range.collect::<Vec<_>>().chunks(chunk) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.publish(room.to_string(), payload(i)).ignore();
        }
        pipe.query_async::<()>(conn).await.unwrap();
        let got = healthy.messages(chunk.len()).await;
        let expected: Vec<String> = chunk.iter().map(|&i| payload(i)).collect();
        assert_eq!(
            got, expected,
            "the healthy viewer gets everything, in order"
        );
    }
}

/// Publishes `2 × half` messages past a stalled viewer and checks, after every chunk,
/// that the session's shared frames stay within their bound (`REPLAY_BYTES`, at least
/// 256 KiB, plus the newest frame). Those frames are all the stalled viewer can pin:
/// it holds a position in them and at most the unwritten rest of one frame, never
/// copies. The stall guard is set far beyond the test so that the viewer stays
/// attached throughout.
async fn assert_memory_plateaus(
    vars: &[(&str, &str)],
    half: usize,
    chunk: usize,
    payload: fn(usize) -> String,
) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut env = vec![
        ("REDIS_URL", url.as_str()),
        ("TICK_MS", "5"),
        ("SLOW_CLIENT_TIMEOUT_MS", "3600000"),
    ];
    env.extend_from_slice(vars);
    let replay_bytes: usize = env
        .iter()
        .find(|(k, _)| *k == "REPLAY_BYTES")
        .map_or(4 << 20, |(_, v)| v.parse().unwrap());
    let server = ServerProcess::spawn(&env).await;
    let room = Uuid::new_v4();
    let mut healthy = Subscriber::connect(&server.url(&sse_path(room)), None).await;
    let _stalled = stalled_viewer(server.addr(), room).await;
    let mut conn = redis.conn().await;
    // A frame holds at most a chunk, each payload framed with a few bytes and named.
    let frame = chunk * (payload(2 * half).len() + 32);
    let bound = replay_bytes.max(256 * 1024) + frame;
    let mut most = 0.0f64;
    for start in (0..2 * half).step_by(chunk) {
        let end = (start + chunk).min(2 * half);
        publish_in_step(&mut conn, room, &mut healthy, start..end, chunk, payload).await;
        let held = server.metric("chat_sync_replay_bytes").await;
        assert!(
            held <= bound as f64,
            "the replay buffer holds {held} bytes, over its bound of {bound}, after {end} messages"
        );
        most = most.max(held);
    }
    assert!(
        most >= replay_bytes.min(2 * half * payload(0).len()) as f64 / 2.0,
        "the replay buffer never filled ({most} bytes): the test did not exercise the bound"
    );
    assert_eq!(
        server.metric("chat_sync_connections").await,
        2.0,
        "the stalled viewer was attached the whole time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_viewer_pins_a_bounded_amount_of_memory() {
    let vars = [("SUBSCRIBER_BUFFER", "64"), ("REPLAY_BYTES", "1048576")];
    assert_memory_plateaus(&vars, 10_000, 40, big_payload).await;
}

/// The audit's case: 16 KB payloads, 12 per batch. With frames of ~190 KB, 128 frames
/// of lag used to pin 24 MiB; the bound is now the session's replay bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_viewer_pins_no_more_than_the_replay_bytes_with_large_payloads() {
    fn large(i: usize) -> String {
        format!(
            r#"{{"id":"p1","seq":{i},"message":"{}"}}"#,
            "y".repeat(16_000)
        )
    }
    assert_memory_plateaus(&[("REPLAY_BYTES", "1048576")], 600, 12, large).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_stops_reading_is_dropped_without_hurting_the_others() {
    /// Stops the test if the guard never fires: 50 MiB, far beyond any socket buffer.
    const MAX_MESSAGES: usize = 50 * 1024 * 1024 / BIG_PAYLOAD_BYTES;
    let redis = RedisServer::start().await;
    let server = ServerProcess::spawn(&[
        ("REDIS_URL", &redis.url()),
        ("TICK_MS", "5"),
        ("SLOW_CLIENT_TIMEOUT_MS", "1000"),
        ("SUBSCRIBER_BUFFER", "64"),
    ])
    .await;
    let room = Uuid::new_v4();
    let mut healthy = Subscriber::connect(&server.url(&sse_path(room)), None).await;
    let mut stalled = stalled_viewer(server.addr(), room).await;
    let metric = |name: &'static str| server.metric(name);

    // Traffic flows (and the healthy viewer keeps up with all of it) until the server
    // cuts the stalled viewer by itself; reading its socket first would unstall it.
    let mut conn = redis.conn().await;
    let mut sent = 0;
    while metric("chat_sync_connections").await > 1.0 {
        assert!(sent < MAX_MESSAGES, "the stalled viewer was never cut");
        publish_in_step(
            &mut conn,
            room,
            &mut healthy,
            sent..sent + 400,
            40,
            big_payload,
        )
        .await;
        sent += 400;
    }
    assert!(metric("chat_sync_slow_subscribers_dropped_total").await >= 1.0);
    // The healthy viewer is unaffected and still live.
    publish_in_step(
        &mut conn,
        room,
        &mut healthy,
        sent..sent + 40,
        40,
        big_payload,
    )
    .await;
    // Draining the stalled socket now reaches the end of a cut-off stream.
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
        drained < sent * BIG_PAYLOAD_BYTES,
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
            // Far beyond the test: a session stays in its grace period throughout.
            ("SESSION_GRACE_MS", "3600000"),
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

    let mut on_b = join_all((0..2).map(|_| app.connect(b))).await;
    assert!(on_b.iter().all(|s| s.status == 200));
    assert_eq!(
        app.get(&sse_path(c)).await.status(),
        503,
        "instance connection limit"
    );
    // b delivers something, so it is a live session that keeps its grace period.
    let to_b = format!("/api/v1/chats/{b}/messages");
    assert_eq!(app.post(&to_b, &chat("p", 0)).await.status(), 202);
    for viewer in &mut on_b {
        viewer.messages(1).await;
    }
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
    /// Ends a session on `app` and returns its id once its viewer saw the end.
    async fn end_one(app: &TestApp) -> Uuid {
        let room = Uuid::new_v4();
        let mut viewer = app.connect(room).await;
        let end = format!("/api/v1/chats/{room}/end");
        assert_eq!(app.post(&end, "").await.status(), 202);
        assert_eq!(viewer.next_event().await.unwrap().event, "end");
        room
    }
    // A TTL far beyond the test: 204, on any machine.
    let lasting = TestApp::spawn(None, &[("ENDED_SESSION_TTL_MS", "3600000")]).await;
    let room = end_one(&lasting).await;
    assert_eq!(lasting.get(&sse_path(room)).await.status(), 204);
    assert_eq!(lasting.get(&sse_path(room)).await.status(), 204);
    // A short one: the id can be used again once it has passed.
    let brief = TestApp::spawn(None, &[("ENDED_SESSION_TTL_MS", "300")]).await;
    let room = end_one(&brief).await;
    wait_until("the session id can be used again", || async {
        brief.get(&sse_path(room)).await.status() == 200
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
    // An oversize end still ends the session, with a payload naming it.
    redis
        .publish(&format!("{room}_END"), &"z".repeat(1025))
        .await;
    let end = viewer.next_event().await.expect("an end event");
    assert_eq!(end.event, "end");
    assert_eq!(end.data, format!(r#"{{"id":"{room}"}}"#));
    assert_eq!(
        app.metric(r#"chat_sync_messages_dropped_total{reason="oversize_end"}"#)
            .await,
        1.0
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
    // Every stream closes at once, so the process exits well before the drain time
    // would cut them; how fast is a machine's figure, not a property to assert.
    let code = server.wait_exit().await;
    assert_eq!(code, Some(0));
    for viewer in &mut viewers {
        let event = viewer.next_event().await.expect("a shutdown event");
        assert_eq!(event.event, "shutdown");
        assert!(viewer.next_event().await.is_none(), "then the stream ends");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_freed_while_redis_is_down_are_unsubscribed_once_it_is_back() {
    let mut redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let rooms: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let viewers = join_all(rooms.iter().map(|r| app.connect(*r))).await;
    redis.kill();
    wait_until("/readyz reports the broker down", || async {
        app.get("/readyz").await.status() == 503
    })
    .await;
    // Their viewers leave while Redis is down: the sessions are freed here, and the
    // unsubscribes wait for Redis without holding anything else up.
    drop(viewers);
    wait_until("the sessions are freed", || async {
        app.ready_field("sessions").await == 0
    })
    .await;
    assert_eq!(app.get(&sse_path(Uuid::new_v4())).await.status(), 503);

    redis.restart().await;
    app.wait_ready().await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    assert_eq!(viewer.status, 200);
    wait_until("the freed sessions are unsubscribed in Redis", || async {
        for r in &rooms {
            if redis.numsub(&r.to_string()).await != 0 {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(redis.numsub(&room.to_string()).await, 1);
    redis.publish(&room.to_string(), &chat("p", 0)).await;
    assert_eq!(viewer.messages(1).await, vec![chat("p", 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_inbox_is_dropped_counted_and_marked_with_a_reset() {
    const BURST: usize = 300;
    let redis = RedisServer::start().await;
    // A long tick and a 64 KiB inbox: about 64 of the ~1 KB messages fit per tick.
    let vars = [("TICK_MS", "1000"), ("INBOX_BYTES", "65536")];
    let app = TestApp::spawn(Some(&redis), &vars).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    let mut pipe = redis::pipe();
    for i in 0..BURST {
        pipe.publish(room.to_string(), big_payload(i)).ignore();
    }
    pipe.query_async::<()>(&mut redis.conn().await)
        .await
        .unwrap();
    let dropped = r#"chat_sync_messages_dropped_total{reason="inbox_full"}"#;
    wait_until(
        "the burst was received, and captured or dropped",
        || async {
            app.metric("chat_sync_messages_received_total").await == BURST as f64
                && app.metric("chat_sync_usage_captured_total").await + app.metric(dropped).await
                    == BURST as f64
        },
    )
    .await;
    let marker = big_payload(BURST);
    redis.publish(&room.to_string(), &marker).await;

    // In order, and every gap announced by a reset right where it is.
    let (mut received, mut last, mut reset_since_last) = (0usize, None::<usize>, false);
    loop {
        let event = viewer.next_event().await.expect("the stream stays open");
        if event.event == "reset" {
            reset_since_last = true;
            continue;
        }
        assert_eq!(event.event, "message");
        for payload in batch(&event) {
            let seq = crate::common::seq_of(&payload).1;
            if let Some(last) = last {
                assert!(seq > last, "{seq} after {last}");
                assert!(
                    seq == last + 1 || reset_since_last,
                    "{seq} after {last}, unmarked"
                );
            }
            (last, reset_since_last) = (Some(seq), false);
            received += 1;
        }
        if last == Some(BURST) {
            break;
        }
    }
    let dropped = app.metric(dropped).await as usize;
    assert!(dropped > 0, "the burst did not fit");
    assert_eq!(
        received + dropped,
        BURST + 1,
        "every message delivered or counted"
    );
    assert_eq!(
        app.metric("chat_sync_usage_captured_total").await as usize,
        received,
        "dropped messages are not billed"
    );
}
