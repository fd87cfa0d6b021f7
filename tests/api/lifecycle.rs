//! How sessions begin and end: one Redis subscription per session, freed on `_END`
//! or after the grace period, and `204` for connects to an ended session.

use futures::future::join_all;
use uuid::Uuid;

use crate::common::{RedisServer, Subscriber, TestApp, chat, sse_path, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_closes_the_session_streams_and_unsubscribes_it() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let other = Uuid::new_v4();
    let mut viewers = join_all((0..3).map(|_| app.connect(room))).await;
    let mut bystander = app.connect(other).await;
    assert_eq!(
        redis.numsub(&room.to_string()).await,
        1,
        "one subscription per session"
    );
    assert_eq!(redis.numsub(&format!("{room}_END")).await, 1);

    redis.publish(&room.to_string(), &chat("p1", 0)).await;
    let end = format!(
        r#"{{"id":"{room}","createdAt":"2026-11-24T10:00:00","deletedAt":"2026-11-24T11:00:00"}}"#
    );
    redis.publish(&format!("{room}_END"), &end).await;

    for viewer in &mut viewers {
        assert_eq!(
            viewer.messages(1).await,
            vec![chat("p1", 0)],
            "messages before the end arrive"
        );
        let event = viewer.next_event().await.expect("an end event");
        assert_eq!(event.event, "end");
        assert_eq!(event.data, end);
        assert!(
            viewer.next_event().await.is_none(),
            "the stream closes after end"
        );
    }
    wait_until("the ended session is unsubscribed", || async {
        redis.numsub(&room.to_string()).await == 0
            && redis.numsub(&format!("{room}_END")).await == 0
    })
    .await;
    let late = app.connect(room).await;
    assert_eq!(
        late.status, 204,
        "an ended session tells EventSource to stop"
    );

    redis.publish(&other.to_string(), &chat("p2", 0)).await;
    assert_eq!(
        bystander.messages(1).await,
        vec![chat("p2", 0)],
        "other sessions keep streaming"
    );
    assert_eq!(app.ready_field("sessions").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwatched_session_is_freed_after_the_grace_period() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("SESSION_GRACE_MS", "300")]).await;
    let room = Uuid::new_v4();
    let mut viewers = join_all((0..2).map(|_| app.connect(room))).await;
    assert_eq!(redis.numsub(&room.to_string()).await, 1);
    assert_eq!(app.ready_field("sessions").await, 1);
    assert_eq!(app.ready_field("connections").await, 2);
    // A live session (it delivered something) gets the grace period.
    redis.publish(&room.to_string(), &chat("p1", 0)).await;
    for viewer in &mut viewers {
        viewer.messages(1).await;
    }

    drop(viewers);
    wait_until("the session is freed and unsubscribed", || async {
        app.ready_field("sessions").await == 0
            && app.ready_field("connections").await == 0
            && redis.numsub(&room.to_string()).await == 0
            && redis.numsub(&format!("{room}_END")).await == 0
    })
    .await;

    // Coming back later subscribes again and works as before.
    let mut viewer = app.connect(room).await;
    assert_eq!(redis.numsub(&room.to_string()).await, 1);
    redis.publish(&room.to_string(), &chat("p1", 7)).await;
    assert_eq!(viewer.messages(1).await, vec![chat("p1", 7)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_connects_subscribe_once() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let url = app.url(&sse_path(room));
    let mut viewers: Vec<Subscriber> =
        join_all((0..50).map(|_| Subscriber::connect(&url, None))).await;
    assert!(viewers.iter().all(|v| v.status == 200));
    assert_eq!(redis.numsub(&room.to_string()).await, 1);
    assert_eq!(app.ready_field("sessions").await, 1);
    redis.publish(&room.to_string(), &chat("p1", 1)).await;
    for viewer in &mut viewers {
        assert_eq!(viewer.messages(1).await, vec![chat("p1", 1)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_seen_on_one_instance_holds_on_every_instance() {
    let redis = RedisServer::start().await;
    let a = TestApp::spawn(Some(&redis), &[("INSTANCE_ID", "a")]).await;
    let b = TestApp::spawn(Some(&redis), &[("INSTANCE_ID", "b")]).await;
    let room = Uuid::new_v4();
    let mut on_a = a.connect(room).await;
    redis.publish(&format!("{room}_END"), r#"{"id":"x"}"#).await;
    assert_eq!(on_a.next_event().await.unwrap().event, "end");
    wait_until("a has freed the ended session", || async {
        redis.numsub(&room.to_string()).await == 0
    })
    .await;

    // b never watched the session, yet answers as a does: 204, or, for a connect
    // racing with a's note of the end, a stream that ends at once with the same `end`.
    let mut first = b.connect(room).await;
    if first.status == 200 {
        let event = first.next_event().await.expect("an end event");
        assert_eq!(
            (event.event.as_str(), event.data.as_str()),
            ("end", r#"{"id":"x"}"#)
        );
    } else {
        assert_eq!(first.status, 204);
    }
    assert_eq!(b.connect(room).await.status, 204);
    assert_eq!(a.connect(room).await.status, 204);
    wait_until("no instance keeps a session or a subscription", || async {
        b.ready_field("sessions").await == 0
            && redis.numsub(&room.to_string()).await == 0
            && redis.numsub(&format!("{room}_END")).await == 0
    })
    .await;
}
