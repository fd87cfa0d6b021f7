//! Delivery classes (`class`): what the stream URL's `interval_ms`, `max_batch` and
//! `history` change for one viewer and for nobody else, and a viewer that reads slowly
//! being caught up with merged batches instead of being cut off.

use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::common::{RedisServer, Subscriber, TestApp, batch, chat, seq_of, sse_path};

/// What a viewer read: each event's name and the `seq`s of its messages (or, for
/// `skipped`, the count), until it holds message `last`.
async fn read_until(viewer: &mut Subscriber, last: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    loop {
        let e = viewer.next_event().await.expect("stream open");
        let seqs = match e.event.as_str() {
            "message" => batch(&e).iter().map(|p| seq_of(p).1).collect(),
            "skipped" => {
                let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
                vec![v["skipped"].as_u64().expect("a count") as usize]
            }
            other => panic!("unexpected {other} event"),
        };
        let done = e.event == "message" && seqs.last() == Some(&last);
        out.push((e.event, seqs));
        if done {
            return out;
        }
    }
}

/// The messages of `events`, in order.
fn messages(events: &[(String, Vec<usize>)]) -> Vec<usize> {
    events
        .iter()
        .filter(|(name, _)| name == "message")
        .flat_map(|(_, seqs)| seqs.clone())
        .collect()
}

#[tokio::test]
async fn bad_delivery_parameters_get_400_naming_the_parameter() {
    let app = TestApp::spawn(None, &[]).await;
    let path = sse_path(Uuid::new_v4());
    for (query, name) in [
        ("interval_ms=-5", "interval_ms"),
        ("interval_ms=600000", "interval_ms"),
        ("interval_ms=abc", "interval_ms"),
        ("max_batch=0", "max_batch"),
        ("max_batch=1e3", "max_batch"),
        ("history=100000", "history"),
        ("history=", "history"),
    ] {
        let response = app.get(&format!("{path}?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "BAD_REQUEST", "{query}");
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with(name), "{query}: {message}");
    }
    // Parameters it does not know (a page's cache-buster) are left alone.
    let viewer = Subscriber::connect(&app.url(&format!("{path}?v=3&interval_ms=100")), None).await;
    assert_eq!(viewer.status, 200);
}

#[tokio::test]
async fn a_joining_viewer_asking_for_history_gets_the_last_messages_first() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut first = Subscriber::connect(&url, None).await;
    for seq in 0..30 {
        redis.publish(&room.to_string(), &chat("p1", seq)).await;
    }
    first.messages(30).await;

    let mut joining = Subscriber::connect(&format!("{url}?history=10"), None).await;
    let recent = joining.next_event().await.unwrap();
    assert_eq!(recent.event, "message");
    let seqs: Vec<usize> = batch(&recent).iter().map(|p| seq_of(p).1).collect();
    assert_eq!(
        seqs,
        (20..30).collect::<Vec<_>>(),
        "the newest 10, in one event"
    );
    redis.publish(&room.to_string(), &chat("p1", 30)).await;
    let live: Vec<usize> = joining
        .messages(1)
        .await
        .iter()
        .map(|p| seq_of(p).1)
        .collect();
    assert_eq!(live, vec![30], "then the live stream, no gap and no repeat");

    // More than it holds: what it holds. A resume is not a join: no history.
    let mut all = Subscriber::connect(&format!("{url}?history=500"), None).await;
    assert_eq!(batch(&all.next_event().await.unwrap()).len(), 31);
    let resumed = first.last_event_id.clone();
    let mut back = Subscriber::connect(&format!("{url}?history=10"), resumed.as_deref()).await;
    redis.publish(&room.to_string(), &chat("p1", 31)).await;
    let after: Vec<usize> = back.messages(1).await.iter().map(|p| seq_of(p).1).collect();
    assert_eq!(after, vec![30], "a resume gets what it missed, not history");
}

/// How often a class is sent (at most once per its ticks, what it held merged) is
/// `class::tests`' to show, with the ticks under its control; here, what a viewer of a
/// slower class reads over real HTTP, plain and gzip.
#[tokio::test]
async fn a_slower_class_gets_every_message_once_in_order() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut every_tick = Subscriber::connect(&url, None).await;
    let mut slower = Subscriber::connect(&format!("{url}?interval_ms=3000"), None).await;
    // The same class, gzip-compressed: the class's viewers share one compressor.
    let mut slower_gzip = Subscriber::connect_gzip(&format!("{url}?interval_ms=3000"), None).await;

    // 20 groups, each its own tick for the every-tick viewer (it is waited for).
    let n = 100;
    for seq in 0..n {
        redis.publish(&room.to_string(), &chat("p1", seq)).await;
        if seq % 5 == 4 {
            every_tick.messages(5).await;
        }
    }
    let events = read_until(&mut slower, n - 1).await;
    assert_eq!(
        messages(&read_until(&mut slower_gzip, n - 1).await),
        messages(&events),
        "a gzip viewer of the class reads the same"
    );
    assert_eq!(
        messages(&events),
        (0..n).collect::<Vec<_>>(),
        "every message once, in order"
    );
}

#[tokio::test]
async fn max_batch_keeps_the_newest_and_says_how_many_were_skipped() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let capped_url = format!("{url}?max_batch=3&interval_ms=1000");
    let mut everything = Subscriber::connect(&url, None).await;
    let mut capped = Subscriber::connect(&capped_url, None).await;
    redis.publish(&room.to_string(), &chat("p1", 0)).await;
    everything.messages(1).await;
    assert_eq!(messages(&read_until(&mut capped, 0).await), vec![0]);
    // Away while 39 more come: its resume is one catch-up, so however the server
    // batched them, at most 3 of them come and the rest are skipped.
    let at = capped.last_event_id.clone();
    drop(capped);
    let n = 40;
    for seq in 1..n {
        redis.publish(&room.to_string(), &chat("p1", seq)).await;
    }
    everything.messages(n - 1).await;
    let mut capped = Subscriber::connect(&capped_url, at.as_deref()).await;
    redis.publish(&room.to_string(), &chat("p1", n)).await;
    let events = read_until(&mut capped, n).await;

    // Each batch is at most 3 messages, and says (just before it) how many came
    // between it and the batch before: together, exactly the published sequence.
    let mut next = 1;
    let mut told = 0;
    let mut skipped = 0;
    for (name, seqs) in &events {
        if name == "skipped" {
            told = seqs[0];
            continue;
        }
        assert!(seqs.len() <= 3, "{seqs:?}");
        assert_eq!(seqs[0], next + told, "skips as said, nothing else missing");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        skipped += told;
        told = 0;
        next = seqs.last().unwrap() + 1;
    }
    assert_eq!(next, n + 1);
    assert!(skipped >= 36, "{skipped} of the 39 missed were skipped");
    // What the original client does with each batch still works: every element is a
    // JSON string holding a chat message.
    assert!(
        events
            .iter()
            .filter(|(name, _)| name == "message")
            .all(|(_, seqs)| !seqs.is_empty())
    );
    assert_eq!(
        app.metric("chat_sync_messages_skipped_total").await,
        skipped as f64
    );
}

/// `chat(.., seq)` with 10 KB more: the test's 15 MB are more than the kernel's socket
/// buffers hold, so the slow reader falls far behind in the server too.
fn bulky(seq: usize) -> String {
    let mut message: serde_json::Value = serde_json::from_str(&chat("p1", seq)).unwrap();
    message["attachment"] = "z".repeat(10_240).into();
    message.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_caught_up_with_merged_batches_and_keeps_its_stream() {
    let redis = RedisServer::start().await;
    // Falling 16 frames behind the signals used to cut a viewer off. The replay
    // buffer keeps all of this test's frames, and the stall guard waits for a reader
    // this slow.
    let app = TestApp::spawn(
        Some(&redis),
        &[
            ("SUBSCRIBER_BUFFER", "16"),
            ("SLOW_CLIENT_TIMEOUT_MS", "600000"),
            ("REPLAY_BATCHES", "100000"),
            ("REPLAY_BYTES", "268435456"),
        ],
    )
    .await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut fast = Subscriber::connect(&url, None).await;
    let mut slow = app.slow_viewer(room, "").await;
    app.wait_in_step(2).await;

    // One batch per publish for the fast viewer (it is waited for); the slow one
    // reads a little now and then, and falls hundreds of frames behind.
    let n = 1500;
    let mut received = Vec::new();
    for seq in 0..n {
        redis.publish(&room.to_string(), &bulky(seq)).await;
        fast.messages(1).await;
        if seq % 10 == 9 {
            crate::common::read_a_little(&mut slow, &mut received).await;
        }
    }
    redis
        .publish(&format!("{room}_END"), &format!(r#"{{"id":"{room}"}}"#))
        .await;
    slow.read_to_end(&mut received).await.unwrap();

    let text = String::from_utf8(received).unwrap();
    let body = text.split_once("\r\n\r\n").expect("a response head").1;
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| e.contains("data: ["))
        .collect();
    let seqs: Vec<usize> = events
        .iter()
        .flat_map(|e| {
            let data = e.split_once("data: ").unwrap().1;
            serde_json::from_str::<Vec<String>>(data).unwrap()
        })
        .map(|p| seq_of(&p).1)
        .collect();
    assert!(
        seqs == (0..n).collect::<Vec<_>>(),
        "every message once, in order: got {} up to {:?}, cut off {} times, ending {:?}",
        seqs.len(),
        seqs.last(),
        app.metric("chat_sync_slow_subscribers_dropped_total").await,
        &body[body.len().saturating_sub(200)..]
    );
    assert!(
        body.ends_with(&format!("event: end\ndata: {{\"id\":\"{room}\"}}\n\n")),
        "and its stream ended at the end, not before"
    );
    assert_eq!(
        app.metric("chat_sync_slow_subscribers_dropped_total").await,
        0.0,
        "never cut off"
    );
    assert!(app.metric("chat_sync_catch_ups_total").await >= 1.0);
    // Each message was its own batch (the fast viewer was waited for): an event with
    // more is frames merged.
    let most = events
        .iter()
        .map(|e| e.matches("\\\"seq\\\":").count())
        .max();
    assert!(
        most > Some(1),
        "what it missed came merged: at most {most:?} per event"
    );
}

#[tokio::test]
async fn a_paced_viewer_that_leaves_is_let_go() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut stays = Subscriber::connect(&url, None).await;
    let leaves = Subscriber::connect(&format!("{url}?interval_ms=5000&max_batch=5"), None).await;
    app.wait_in_step(2).await;
    drop(leaves);
    crate::common::wait_until("it left", || async {
        app.metric("chat_sync_connections").await == 1.0
    })
    .await;
    // Its class is gone with it: a message reaches one viewer, not two.
    let before = app.metric("chat_sync_messages_delivered_total").await;
    redis.publish(&room.to_string(), &chat("p1", 0)).await;
    stays.messages(1).await;
    assert_eq!(
        app.metric("chat_sync_messages_delivered_total").await,
        before + 1.0
    );
}

#[tokio::test]
async fn a_session_serves_a_bounded_number_of_classes() {
    let app = TestApp::spawn(None, &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let class = |i: usize| format!("{url}?max_batch={}", i + 1);
    let mut viewers = Vec::new();
    for i in 0..16 {
        viewers.push(Subscriber::connect(&class(i), None).await);
    }
    app.wait_in_step(16).await;
    let refused = app.get(&format!("{}?max_batch=17", sse_path(room))).await;
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("delivery classes")
    );
    // An existing class, or every tick, is still served.
    assert_eq!(Subscriber::connect(&class(3), None).await.status, 200);
    assert_eq!(Subscriber::connect(&url, None).await.status, 200);
    // Once a class has no viewer left, another may take its place.
    drop(viewers.remove(0));
    crate::common::wait_until("a class is free", || async {
        app.get(&format!("{}?max_batch=17", sse_path(room)))
            .await
            .status()
            == 200
    })
    .await;
}
