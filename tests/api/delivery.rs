//! What viewers receive: every message, once, in order, batched per tick.

use std::collections::HashMap;

use futures::future::join_all;
use tokio::sync::watch;
use uuid::Uuid;

use crate::common::{RedisServer, Subscriber, TestApp, chat, redis_conn, seq_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_reaches_every_subscriber_in_order_once_and_batched() {
    let redis = RedisServer::start().await;
    // A long tick, so that "far fewer events than messages" below could only fail if
    // the burst took longer to arrive than the harness waits for it anyway.
    let app = TestApp::spawn(Some(&redis), &[("TICK_MS", "100")]).await;
    let room = Uuid::new_v4();
    let other = Uuid::new_v4();
    let mut viewers = join_all((0..3).map(|_| app.connect(room))).await;
    let mut bystander = app.connect(other).await;
    assert!(viewers.iter().all(|v| v.status == 200));
    assert_eq!(viewers[0].headers["content-type"], "text/event-stream");
    assert_eq!(viewers[0].headers["cache-control"], "no-cache");
    assert_eq!(viewers[0].headers["x-accel-buffering"], "no");

    let sent: Vec<String> = (0..1000).map(|i| chat("p1", i)).collect();
    let mut pipe = redis::pipe();
    for payload in &sent {
        pipe.publish(room.to_string(), payload).ignore();
    }
    pipe.query_async::<()>(&mut redis.conn().await)
        .await
        .unwrap();

    let received = join_all(viewers.iter_mut().map(|v| v.messages(1000))).await;
    for (viewer, got) in viewers.iter().zip(&received) {
        assert_eq!(
            got, &sent,
            "every message once, in publish order, byte for byte"
        );
        assert!(
            viewer.batches < 500,
            "1,000 messages should arrive in far fewer events, got {}",
            viewer.batches
        );
    }
    // Nothing else is pending: a marker published now is the very next message.
    redis.publish(&room.to_string(), &chat("marker", 0)).await;
    for viewer in &mut viewers {
        assert_eq!(viewer.messages(1).await, vec![chat("marker", 0)]);
    }

    // The other session got none of them: its first message is its own.
    redis.publish(&other.to_string(), &chat("p2", 0)).await;
    assert_eq!(bystander.messages(1).await, vec![chat("p2", 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_lose_and_duplicate_nothing_across_many_ticks() {
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: usize = 600;
    const BLOCK: usize = 8;
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("TICK_MS", "5")]).await;
    let room = Uuid::new_v4();
    let mut viewers: Vec<Subscriber> = join_all((0..3).map(|_| app.connect(room))).await;

    // A pacer viewer counts the batches it sees; each publisher sends a block, then
    // waits for a batch it has not seen yet, so the traffic spans at least
    // PER_PUBLISHER / BLOCK ticks on any machine, interleaved with capture.
    let (seen_tx, seen) = watch::channel(0usize);
    let mut pacer = app.connect(room).await;
    let pacing = tokio::spawn(async move {
        let mut got = 0;
        while got < PUBLISHERS * PER_PUBLISHER {
            got += pacer.messages(1).await.len();
            seen_tx.send_modify(|n| *n += 1);
        }
    });
    let publishers = (0..PUBLISHERS).map(|p| {
        let url = redis.url();
        let mut seen = seen.clone();
        tokio::spawn(async move {
            let mut conn = redis_conn(&url).await;
            for block in 0..PER_PUBLISHER / BLOCK {
                let before = *seen.borrow_and_update();
                for i in block * BLOCK..(block + 1) * BLOCK {
                    let _: usize = redis::AsyncCommands::publish(
                        &mut conn,
                        room.to_string(),
                        chat(&format!("p{p}"), i),
                    )
                    .await
                    .unwrap();
                }
                seen.wait_for(|&n| n > before).await.unwrap();
            }
        })
    });
    let readers = viewers
        .iter_mut()
        .map(|v| v.messages(PUBLISHERS * PER_PUBLISHER));
    let (received, published) = tokio::join!(join_all(readers), join_all(publishers));
    assert!(published.iter().all(Result::is_ok));
    pacing.await.unwrap();

    for (viewer, got) in viewers.iter().zip(received) {
        assert_eq!(got.len(), PUBLISHERS * PER_PUBLISHER);
        let mut next: HashMap<String, usize> = HashMap::new();
        for payload in &got {
            let (sender, seq) = seq_of(payload);
            let expected = next.entry(sender.clone()).or_default();
            assert_eq!(seq, *expected, "{sender}: lost, duplicated or reordered");
            *expected += 1;
        }
        assert!(next.values().all(|&n| n == PER_PUBLISHER));
        assert!(
            viewer.batches >= PER_PUBLISHER / BLOCK,
            "the traffic should span many ticks, got {} batches",
            viewer.batches
        );
    }
    // Nothing more is pending: a marker published now is the very next message.
    redis.publish(&room.to_string(), &chat("marker", 0)).await;
    for viewer in &mut viewers {
        assert_eq!(viewer.messages(1).await, vec![chat("marker", 0)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_are_forwarded_as_strings_whatever_they_contain() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    let nasty = [
        "not json",
        "line\n\ndata: injected\n\nevent: end",
        "\"quoted\"",
        "ünïcode ✓",
    ];
    for payload in nasty {
        redis.publish(&room.to_string(), payload).await;
    }
    assert_eq!(viewer.messages(nasty.len()).await, nasty);
}
