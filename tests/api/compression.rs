//! gzip streams (`gzip`): a viewer that accepts gzip reads exactly the events a plain
//! viewer reads, each as soon as it is sent, through joins, resumes, slow reading and
//! the end, and its stream ends with a valid trailer.

use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::common::sse::Gunzip;
use crate::common::{RedisServer, Subscriber, TestApp, batch, chat, sse_path};

/// A chat message as a real one looks: nickname, profile URL, mixed-language text.
fn realistic(seq: usize) -> String {
    let texts = [
        "안녕하세요! 오늘 방송 너무 재밌어요 ㅋㅋㅋ",
        "what a play, did you see that??",
        "첫 방송부터 보고 있어요, 항상 응원합니다",
        "lol the chat is so fast today",
        "이거 진짜 대박이다",
    ];
    serde_json::json!({
        "id": format!("{:08x}-1c2d-4e5f-8a9b-{:012x}", seq * 7919, seq * 104_729),
        "nickname": format!("viewer_{}", seq % 37),
        "profileImgUrl": format!("https://cdn.example.com/profiles/{}/avatar.png", seq % 37),
        "message": format!("{} #{seq}", texts[seq % texts.len()]),
        "createdAt": format!("2026-11-27T10:{:02}:{:02}.{:03}", seq / 60 % 60, seq % 60, seq % 1000),
        "seq": seq,
    })
    .to_string()
}

fn varies_by_encoding(viewer: &Subscriber) -> bool {
    viewer
        .headers
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap_or("").contains("accept-encoding"))
}

/// Every event's id, name and data, in order, until `n` messages were read.
async fn events_until(viewer: &mut Subscriber, n: usize) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut messages = 0;
    while messages < n {
        let e = viewer.next_event().await.expect("stream open");
        if e.event == "message" {
            messages += batch(&e).len();
        }
        out.push((e.id, e.event, e.data));
    }
    out
}

#[tokio::test]
async fn a_gzip_viewer_reads_what_a_plain_one_does_each_batch_at_once() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut plain = Subscriber::connect(&url, None).await;
    let mut zipped = Subscriber::connect_gzip(&url, None).await;
    assert_eq!(zipped.headers["content-encoding"], "gzip");
    assert!(varies_by_encoding(&zipped));
    assert!(plain.headers.get("content-encoding").is_none());
    assert!(
        varies_by_encoding(&plain),
        "a cache must not serve one for the other"
    );

    // One message, one event: nothing held back for a later write.
    redis.publish(&room.to_string(), &realistic(0)).await;
    assert_eq!(zipped.messages(1).await, vec![realistic(0)]);
    assert_eq!(plain.messages(1).await, vec![realistic(0)]);

    // Batches of every size, from 1 to many messages.
    let mut sent = 1;
    for burst in [1, 3, 40, 1, 7, 120] {
        for seq in sent..sent + burst {
            redis.publish(&room.to_string(), &realistic(seq)).await;
        }
        sent += burst;
    }
    let expected = events_until(&mut plain, sent - 1).await;
    assert_eq!(events_until(&mut zipped, sent - 1).await, expected);

    redis
        .publish(&format!("{room}_END"), &format!(r#"{{"id":"{room}"}}"#))
        .await;
    assert_eq!(zipped.next_event().await.unwrap().event, "end");
    assert!(
        zipped.next_event().await.is_none(),
        "the stream ends at `end`"
    );
    let whole = zipped
        .gzip_whole()
        .unwrap()
        .expect("a whole gzip stream, trailer right");
    let text = String::from_utf8(whole).unwrap();
    assert!(text.ends_with(&format!("event: end\ndata: {{\"id\":\"{room}\"}}\n\n")));
    let wire = zipped.gzip_wire_len().unwrap();
    assert!(
        wire * 2 < text.len(),
        "compressed: {wire} bytes on the wire for {} of stream",
        text.len()
    );
    let (frames, on_wire) = (
        app.metric("chat_sync_gzip_frame_bytes_total").await,
        app.metric("chat_sync_gzip_wire_bytes_total").await,
    );
    assert!(
        frames > 0.0 && on_wire < frames,
        "{on_wire} of {frames} bytes"
    );
}

#[tokio::test]
async fn a_gzip_viewer_resumes_between_keyframes_exactly() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    // Keeps the session's compressor running while the other one comes and goes.
    let mut steady = Subscriber::connect_gzip(&url, None).await;
    let mut moving = Subscriber::connect_gzip(&url, None).await;
    for seq in 0..5 {
        redis.publish(&room.to_string(), &realistic(seq)).await;
    }
    assert_eq!(moving.messages(5).await.len(), 5);
    let at = moving.last_event_id.clone().expect("batches carry ids");
    drop(moving);
    for seq in 5..15 {
        redis.publish(&room.to_string(), &realistic(seq)).await;
    }
    assert_eq!(steady.messages(15).await.len(), 15);

    let mut back = Subscriber::connect_gzip(&url, Some(&at)).await;
    let missed: Vec<String> = (5..15).map(realistic).collect();
    assert_eq!(back.messages(10).await, missed, "exactly what it missed");
    for seq in 15..60 {
        redis.publish(&room.to_string(), &realistic(seq)).await;
        if seq % 9 == 0 {
            // Frames apart, so that it joins the shared bytes at a keyframe meanwhile.
            steady.messages(1).await;
        }
    }
    let live: Vec<String> = (15..60).map(realistic).collect();
    assert_eq!(back.messages(45).await, live, "then live, in step or not");
    app.stop().await;
    assert_eq!(back.next_event().await.unwrap().event, "shutdown");
    assert!(back.next_event().await.is_none());
    back.gzip_whole()
        .unwrap()
        .expect("ends cleanly at shutdown, trailer right");
}

/// `realistic(seq)` with 3 KB that hardly compresses, so that a slow reader's socket
/// fills however well the rest compresses.
fn bulky(seq: usize) -> String {
    let mut x = (seq as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let noise: String = (0..3072)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Printable, and neither a quote nor a backslash.
            char::from(b'0' + (x % 75) as u8)
        })
        .collect();
    let mut message: serde_json::Value = serde_json::from_str(&realistic(seq)).unwrap();
    message["attachment"] = noise.into();
    message.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_gzip_viewer_is_handed_back_and_its_stream_stays_whole() {
    let redis = RedisServer::start().await;
    // Room enough to catch up from, and time, so that falling behind never cuts it
    // off (a socket that has queued megabytes is not writable again until a third
    // of them drained, which at this reader's pace takes longer than the stall guard).
    let app = TestApp::spawn(
        Some(&redis),
        &[
            ("SLOW_CLIENT_TIMEOUT_MS", "600000"),
            ("SUBSCRIBER_BUFFER", "65536"),
            ("REPLAY_BATCHES", "100000"),
            ("REPLAY_BYTES", "268435456"),
        ],
    )
    .await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut fast = Subscriber::connect_gzip(&url, None).await;
    // A reader with a small receive buffer that reads only now and then: the server's
    // writes to it are partial, it is handed back to its task, and catches up again.
    let mut slow = app.slow_viewer(room, "Accept-Encoding: gzip\r\n").await;
    app.wait_in_step(2).await;

    let n = 3000;
    let mut received = Vec::new();
    let mut fewest_in_step = 2.0f64;
    for seq in 0..n {
        redis.publish(&room.to_string(), &bulky(seq)).await;
        if seq % 10 == 9 {
            // Paced by the fast viewer; the slow one reads a little now and then.
            fast.messages(10).await;
            fewest_in_step = fewest_in_step.min(app.metric("chat_sync_viewers_in_step").await);
            crate::common::read_a_little(&mut slow, &mut received).await;
        }
    }
    assert!(fewest_in_step < 2.0, "the slow viewer was handed back");
    redis
        .publish(&format!("{room}_END"), &format!(r#"{{"id":"{room}"}}"#))
        .await;
    slow.read_to_end(&mut received).await.unwrap();
    assert_eq!(
        app.metric("chat_sync_slow_subscribers_dropped_total").await,
        0.0
    );

    let body_at = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&received[..body_at]).to_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut gunzip = Gunzip::default();
    let streamed = gunzip.feed(&received[body_at..]);
    let whole = gunzip.whole().expect("a whole gzip stream, trailer right");
    assert_eq!(streamed, whole, "what was decoded as it came is the whole");
    let text = String::from_utf8(whole).unwrap();
    let seqs: Vec<u64> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("id: ")?.split_once("\ndata: "))
        .flat_map(|(_, data)| serde_json::from_str::<Vec<String>>(data).unwrap())
        .map(|p| {
            serde_json::from_str::<serde_json::Value>(&p).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        seqs,
        (0..n as u64).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert!(text.ends_with(&format!("event: end\ndata: {{\"id\":\"{room}\"}}\n\n")));
}

#[tokio::test]
async fn with_compression_off_every_viewer_gets_the_plain_stream() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("COMPRESSION", "false")]).await;
    let room = Uuid::new_v4();
    let mut viewer = Subscriber::connect_gzip(&app.url(&sse_path(room)), None).await;
    assert!(viewer.headers.get("content-encoding").is_none());
    assert!(!varies_by_encoding(&viewer));
    redis.publish(&room.to_string(), &chat("a", 0)).await;
    assert_eq!(viewer.messages(1).await, vec![chat("a", 0)]);
    assert_eq!(app.metric("chat_sync_gzip_wire_bytes_total").await, 0.0);
}

#[tokio::test]
async fn a_browsers_stream_after_any_page_or_probe_is_still_compressed() {
    let app = TestApp::spawn(None, &[]).await;
    let room = Uuid::new_v4();
    // One client, one connection pool, as a browser tab: whatever it fetched before,
    // its stream must not be sent on a connection hyper kept (which is served plain).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    for path in ["/healthz", "/readyz", "/openapi.json", "/", "/metrics"] {
        let response = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.headers()["connection"], "close", "{path}");
        response.bytes().await.unwrap();
        let stream = client
            .get(app.url(&sse_path(room)))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 200);
        assert_eq!(
            stream
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            Some("gzip"),
            "a stream after {path}"
        );
    }
}

/// Compressors are bounded in memory (`GZIP_MEMORY_BYTES`), since each session and
/// delivery class with gzip viewers runs one while it sends. With less than one
/// compressor's worth, every session is past the bound: its gzip viewers still read
/// exactly what plain ones do, in whole gzip streams, only sent as stored blocks.
#[tokio::test]
async fn past_the_compressor_bound_gzip_streams_are_whole_and_uncompressed() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("GZIP_MEMORY_BYTES", "100000")]).await;
    let rooms = [Uuid::new_v4(), Uuid::new_v4()];
    let mut viewers = Vec::new();
    for room in rooms {
        let url = app.url(&sse_path(room));
        let plain = Subscriber::connect(&url, None).await;
        let zipped = Subscriber::connect_gzip(&url, None).await;
        assert_eq!(zipped.headers["content-encoding"], "gzip");
        viewers.push((room, plain, zipped));
    }
    // In step: the frames go through the sessions' shared gzip stream, which is what
    // would take a compressor.
    app.wait_in_step(4).await;
    for seq in 0..30 {
        for (room, ..) in &viewers {
            redis.publish(&room.to_string(), &realistic(seq)).await;
        }
    }
    for (room, plain, zipped) in &mut viewers {
        let expected = events_until(plain, 30).await;
        assert_eq!(events_until(zipped, 30).await, expected);
        redis
            .publish(&format!("{room}_END"), &format!(r#"{{"id":"{room}"}}"#))
            .await;
        assert_eq!(zipped.next_event().await.unwrap().event, "end");
        assert!(zipped.next_event().await.is_none());
        let text = zipped.gzip_whole().unwrap().expect("a whole gzip stream");
        let wire = zipped.gzip_wire_len().unwrap();
        assert!(
            wire > text.len(),
            "stored, not compressed: {wire} bytes on the wire for {} of stream",
            text.len()
        );
    }
    assert_eq!(app.metric("chat_sync_gzip_compressors").await, 0.0);
    assert!(app.metric("chat_sync_gzip_compressors_refused_total").await >= 2.0);
}
