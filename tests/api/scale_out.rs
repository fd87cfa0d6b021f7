//! Scaling out: three instances behind the real nginx with `deploy/nginx.conf` (only
//! the upstream addresses and the listen port substituted), routing by session id.
//! Latency through nginx is a benchmark figure (`bench/run.sh`, scenario
//! `nginx-rooms`), not something a test on a shared machine can judge.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use uuid::Uuid;

use crate::common::nginx::{Nginx, deploy_config};
use crate::common::{RedisServer, Subscriber, TestApp, chat, sse_path, wait_until};

fn instance(viewer: &Subscriber) -> String {
    viewer.headers["x-instance-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Publishes one small message per session and checks that every viewer gets exactly
/// its session's message while its stream stays open. A proxy that buffers the stream
/// holds such a message until its buffer fills or the upstream closes, which here is
/// never: so this fails (after the harness's generous wait) if nginx buffers, and a
/// slow machine only makes it take longer.
async fn publish_one_each_and_expect_it(
    redis: &RedisServer,
    rooms: &[Uuid],
    viewers: &mut [(usize, Subscriber)],
) {
    let mut pipe = redis::pipe();
    for room in rooms {
        pipe.publish(room.to_string(), format!(r#"{{"id":"p","room":"{room}"}}"#))
            .ignore();
    }
    pipe.query_async::<()>(&mut redis.conn().await)
        .await
        .unwrap();
    join_all(viewers.iter_mut().map(|(room, viewer)| {
        let expected = format!(r#"{{"id":"p","room":"{}"}}"#, rooms[*room]);
        async move {
            let got = viewer.messages(1).await;
            assert_eq!(got, vec![expected]);
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_keeps_each_session_on_one_instance_and_hands_a_stopped_ones_sessions_over() {
    const SESSIONS: usize = 200;
    let redis = RedisServer::start().await;
    let mut apps = Vec::new();
    for i in 1..=3 {
        let id = format!("inst-{i}");
        let vars = [
            ("INSTANCE_ID", id.as_str()),
            ("TICK_MS", "24"),
            ("SHUTDOWN_HANDOVER_MS", "60000"),
        ];
        apps.push(Some(TestApp::spawn(Some(&redis), &vars).await));
    }
    let upstreams: Vec<String> = apps
        .iter()
        .map(|a| {
            a.as_ref()
                .unwrap()
                .base
                .trim_start_matches("http://")
                .to_string()
        })
        .collect();
    let nginx = Nginx::start(&upstreams);

    let rooms: Vec<Uuid> = (0..SESSIONS).map(|_| Uuid::new_v4()).collect();
    let mut viewers: Vec<(usize, Subscriber)> = join_all((0..SESSIONS * 3).map(|i| {
        let url = nginx.url(&sse_path(rooms[i / 3]));
        async move { (i / 3, Subscriber::connect(&url, None).await) }
    }))
    .await;
    assert!(viewers.iter().all(|(_, v)| v.status == 200));

    let mut placed: HashMap<usize, String> = HashMap::new();
    for (room, viewer) in &viewers {
        let at = instance(viewer);
        let first = placed.entry(*room).or_insert_with(|| at.clone());
        assert_eq!(
            *first, at,
            "all connections of a session land on one instance"
        );
    }
    let mut per_instance: HashMap<&str, usize> = HashMap::new();
    for at in placed.values() {
        *per_instance.entry(at).or_default() += 1;
    }
    assert_eq!(
        per_instance.len(),
        3,
        "sessions spread over all instances: {per_instance:?}"
    );
    assert!(
        per_instance.values().all(|&n| n <= SESSIONS / 2),
        "{per_instance:?}"
    );

    publish_one_each_and_expect_it(&redis, &rooms, &mut viewers).await;

    // Stop inst-2 (SIGTERM): its viewers reconnect (as EventSource does) and land
    // elsewhere while it hands its sessions over.
    let gone = "inst-2";
    let stopping = tokio::spawn(apps[1].take().unwrap().stop());
    // Its viewers all reconnect at once, as browsers do.
    let reconnected = join_all(
        viewers
            .iter_mut()
            .filter(|(room, _)| placed[room] == gone)
            .map(|(room, viewer)| {
                let url = nginx.url(&sse_path(rooms[*room]));
                async move {
                    assert_eq!(viewer.next_event().await.unwrap().event, "shutdown");
                    assert!(viewer.next_event().await.is_none());
                    let last = viewer.last_event_id.clone();
                    *viewer = Subscriber::connect(&url, last.as_deref()).await;
                    assert_eq!(viewer.status, 200);
                    (*room, instance(viewer))
                }
            }),
    )
    .await;
    let mut moved: HashMap<usize, String> = HashMap::new();
    for (room, now_at) in reconnected {
        assert_ne!(now_at, gone);
        let first = moved.entry(room).or_insert_with(|| now_at.clone());
        assert_eq!(
            *first, now_at,
            "a moved session still lands on one instance"
        );
    }
    assert!(!moved.is_empty());
    // The stopping instance answered the new instances' join requests, so nothing
    // separates what a moved viewer had from what comes next: no `reset`.
    stopping.await.unwrap();
    // Sessions of the surviving instances did not move: a new connect lands where
    // their viewers already are.
    for (room, at) in placed.iter().filter(|(_, at)| *at != gone).take(20) {
        let extra = Subscriber::connect(&nginx.url(&sse_path(rooms[*room])), None).await;
        assert_eq!(&instance(&extra), at);
    }
    wait_until("every session is subscribed again", || async {
        let mut conn = redis.conn().await;
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB");
        for room in &rooms {
            cmd.arg(room.to_string());
        }
        let counts: Vec<(String, usize)> = cmd.query_async(&mut conn).await.unwrap();
        counts.iter().all(|(_, n)| *n == 1)
    })
    .await;
    // Everyone keeps receiving.
    publish_one_each_and_expect_it(&redis, &rooms, &mut viewers).await;
}

/// The check above can fail: with a copy of the deploy config that buffers streams
/// (and ignores the `X-Accel-Buffering: no` that chat-sync sends, which alone would
/// switch buffering off again), a viewer gets nothing, not even the response head,
/// while the stream is open; the message comes out only when the upstream closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffering_proxy_holds_a_small_message_until_the_stream_closes() {
    let deploy = deploy_config();
    assert!(deploy.contains("proxy_buffering off;"));
    let buffering = deploy.replace(
        "proxy_buffering off;",
        "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;",
    );
    let app = TestApp::spawn(None, &[]).await;
    let upstream = app.base.trim_start_matches("http://").to_string();
    let nginx = Nginx::start_with(&buffering, &[upstream.clone(), upstream.clone(), upstream]);
    let room = Uuid::new_v4();
    let url = nginx.url(&sse_path(room));
    let mut viewer = tokio::spawn(async move {
        let mut viewer = Subscriber::connect(&url, None).await;
        viewer.messages(1).await
    });
    wait_until("the stream is open on the instance", || async {
        app.ready_field("connections").await == 1
    })
    .await;
    let path = format!("/api/v1/chats/{room}/messages");
    assert_eq!(app.post(&path, &chat("p1", 0)).await.status(), 202);
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut viewer)
            .await
            .is_err(),
        "a buffering proxy must hold the message back"
    );
    app.stop().await;
    assert_eq!(
        viewer.await.unwrap(),
        vec![chat("p1", 0)],
        "released when the upstream closed"
    );
}

/// The deploy nginx passes a gzip stream through as chat-sync sent it: not buffered
/// (one message, one event), not re-encoded, and whole at the end.
#[tokio::test]
async fn through_the_deploy_nginx_a_gzip_stream_passes_as_sent() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let upstream = app.base.trim_start_matches("http://").to_string();
    let nginx = Nginx::start(&[upstream.clone(), upstream.clone(), upstream]);
    let room = Uuid::new_v4();
    let mut viewer = Subscriber::connect_gzip(&nginx.url(&sse_path(room)), None).await;
    assert_eq!(viewer.status, 200);
    assert_eq!(viewer.headers["content-encoding"], "gzip");
    redis.publish(&room.to_string(), &chat("a", 0)).await;
    assert_eq!(viewer.messages(1).await, vec![chat("a", 0)]);
    for seq in 1..30 {
        redis.publish(&room.to_string(), &chat("a", seq)).await;
    }
    let rest: Vec<String> = (1..30).map(|seq| chat("a", seq)).collect();
    assert_eq!(viewer.messages(29).await, rest);
    redis
        .publish(&format!("{room}_END"), &format!(r#"{{"id":"{room}"}}"#))
        .await;
    assert_eq!(viewer.next_event().await.unwrap().event, "end");
    assert!(viewer.next_event().await.is_none());
    viewer
        .gzip_whole()
        .unwrap()
        .expect("the stream nginx passed on is whole, trailer right");
}
