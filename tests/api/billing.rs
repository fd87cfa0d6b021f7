//! Usage metering: exact counts to the tenant, never lost, billed once across
//! instances; and the Prometheus metrics that show it.

use std::time::Duration;

use futures::future::join_all;
use uuid::Uuid;

use crate::common::tenant::Tenant;
use crate::common::{
    RedisServer, ServerProcess, Subscriber, TestApp, chat, sse_path, wait_billing_settled,
    wait_until,
};

async fn publish_paced(redis: &RedisServer, room: Uuid, range: std::ops::Range<usize>) {
    let mut conn = redis.conn().await;
    for i in range {
        let _: usize = redis::AsyncCommands::publish(&mut conn, room.to_string(), chat("p1", i))
            .await
            .unwrap();
        if i % 25 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Waits until the tenant's total is `n` and every instance in `apps` has nothing
/// pending and has completed two more flushes since, then checks that it stayed `n`:
/// a double count would have been sent by then.
async fn assert_total_settles(tenant: &Tenant, room: Uuid, n: u64, apps: &[&TestApp]) {
    wait_until(&format!("the tenant has {n} for the session"), || async {
        tenant.total(room) >= n
    })
    .await;
    for app in apps {
        wait_billing_settled(|series| app.metric(series)).await;
    }
    assert_eq!(tenant.total(room), n, "reports: {:?}", tenant.reports(room));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_receives_exactly_n_in_far_fewer_requests_than_ticks() {
    let redis = RedisServer::start().await;
    let tenant = Tenant::start().await;
    let base = tenant.base_url();
    let vars = [
        ("TENANT_BASE_URL", base.as_str()),
        ("BILLING_FLUSH_MS", "500"),
    ];
    let app = TestApp::spawn(Some(&redis), &vars).await;
    let room = Uuid::new_v4();
    let mut viewers: Vec<Subscriber> = join_all((0..3).map(|_| app.connect(room))).await;

    // Ten messages at a time, each block once every viewer has the previous one: at
    // least 60 batches, however fast or slow the machine is.
    let mut conn = redis.conn().await;
    for block in 0..60 {
        for i in block * 10..(block + 1) * 10 {
            let _: usize =
                redis::AsyncCommands::publish(&mut conn, room.to_string(), chat("p1", i))
                    .await
                    .unwrap();
        }
        for viewer in &mut viewers {
            viewer.messages(10).await;
        }
    }
    assert_total_settles(&tenant, room, 600, &[&app]).await;
    let requests = tenant.reports(room).len() as f64;
    let batches = viewers[0].batches as f64;
    let flushes = app.metric("chat_sync_billing_flushes_total").await;
    assert!(batches >= 60.0);
    assert!(
        requests <= flushes && requests < batches,
        "{requests} requests in {flushes} flushes for {batches} batches: counts must be accumulated"
    );
    assert_eq!(
        app.metric("chat_sync_usage_captured_total").await,
        600.0,
        "one count per message, not per viewer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_then_absent_tenant_costs_retries_not_counts() {
    let redis = RedisServer::start().await;
    let mut tenant = Tenant::start().await;
    let base = tenant.base_url();
    let vars = [
        ("TENANT_BASE_URL", base.as_str()),
        ("BILLING_FLUSH_MS", "50"),
        ("BILLING_TIMEOUT_MS", "500"),
    ];
    let app = TestApp::spawn(Some(&redis), &vars).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;

    tenant.answer(500);
    publish_paced(&redis, room, 0..200).await;
    viewer.messages(200).await;
    wait_until("the tenant refused a few reports", || async {
        tenant.refused() >= 2
    })
    .await;

    tenant.go_away();
    publish_paced(&redis, room, 200..300).await;
    viewer.messages(100).await;
    wait_until("reports failed against the absent tenant", || async {
        app.metric(r#"chat_sync_billing_requests_total{outcome="failed"}"#)
            .await
            >= 4.0
    })
    .await;
    assert_eq!(tenant.total(room), 0);
    assert_eq!(app.metric("chat_sync_billing_pending").await, 300.0);

    tenant.answer(200);
    tenant.resume().await;
    assert_total_settles(&tenant, room, 300, &[&app]).await;
    assert_eq!(app.metric("chat_sync_billing_pending").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_serving_one_session_bill_it_once() {
    let redis = RedisServer::start().await;
    let tenant = Tenant::start().await;
    let base = tenant.base_url();
    let vars = |id| {
        [
            ("TENANT_BASE_URL", base.as_str()),
            ("BILLING_FLUSH_MS", "100"),
            ("INSTANCE_ID", id),
        ]
    };
    let a = TestApp::spawn(Some(&redis), &vars("a")).await;
    let b = TestApp::spawn(Some(&redis), &vars("b")).await;
    let room = Uuid::new_v4();
    let mut on_a = a.connect(room).await;
    let mut on_b = b.connect(room).await;
    assert_eq!(
        redis.numsub(&room.to_string()).await,
        2,
        "both instances receive every message"
    );

    publish_paced(&redis, room, 0..500).await;
    on_a.messages(500).await;
    on_b.messages(500).await;
    assert_total_settles(&tenant, room, 500, &[&a, &b]).await;
    assert_eq!(a.metric("chat_sync_usage_captured_total").await, 500.0);
    assert_eq!(b.metric("chat_sync_usage_captured_total").await, 500.0);

    // One instance stops; the other, which also counted all 500, goes on alone and
    // bills only what follows.
    a.stop().await;
    drop(on_a);
    publish_paced(&redis, room, 500..800).await;
    on_b.messages(300).await;
    assert_total_settles(&tenant, room, 800, &[&b]).await;
    drop(on_b);
    b.stop().await;
}

/// The sum of a session's unreported usage in the store (pending and in flight).
async fn stored_usage(redis: &RedisServer, room: Uuid) -> u64 {
    let values: Vec<u64> = redis::cmd("HVALS")
        .arg(format!("chat-sync:billing:{{{room}}}:usage"))
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    values.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counted_by_an_instance_that_dies_during_a_tenant_outage_is_billed() {
    let redis = RedisServer::start().await;
    let mut tenant = Tenant::start().await;
    let base = tenant.base_url();
    let url = redis.url();
    let env = |id| {
        [
            ("REDIS_URL", url.as_str()),
            ("TENANT_BASE_URL", base.as_str()),
            ("BILLING_FLUSH_MS", "100"),
            ("BILLING_TIMEOUT_MS", "500"),
            ("INSTANCE_ID", id),
        ]
    };
    let server = ServerProcess::spawn(&env("a")).await;
    let room = Uuid::new_v4();
    let mut viewer = Subscriber::connect(&server.url(&sse_path(room)), None).await;

    tenant.go_away();
    publish_paced(&redis, room, 0..400).await;
    viewer.messages(400).await;
    wait_until("all 400 are counted in the store", || async {
        stored_usage(&redis, room).await == 400
    })
    .await;
    drop(server); // SIGKILL: nothing is flushed, nothing is released.

    // Another instance, serving other sessions, settles what the dead one left.
    tenant.resume().await;
    let _b = ServerProcess::spawn(&env("b")).await;
    wait_until("the tenant has all 400", || async {
        tenant.total(room) >= 400
    })
    .await;
    wait_until("nothing is left in the store", || async {
        stored_usage(&redis, room).await == 0
    })
    .await;
    assert_eq!(
        tenant.total(room),
        400,
        "reports: {:?}",
        tenant.reports(room)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_pending_usage_before_exit() {
    let redis = RedisServer::start().await;
    let tenant = Tenant::start().await;
    let server = ServerProcess::spawn(&[
        ("REDIS_URL", &redis.url()),
        ("TENANT_BASE_URL", &tenant.base_url()),
        ("BILLING_FLUSH_MS", "3600000"),
    ])
    .await;
    let mut server = server;
    let room = Uuid::new_v4();
    let mut viewer = Subscriber::connect(&server.url(&sse_path(room)), None).await;
    publish_paced(&redis, room, 0..250).await;
    viewer.messages(250).await;
    assert_eq!(
        tenant.total(room),
        0,
        "nothing is flushed before the hour is up"
    );

    server.terminate();
    let code = server.wait_exit().await;
    assert_eq!(code, Some(0));
    assert_eq!(
        tenant.total(room),
        250,
        "pending usage reached the tenant before exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_follow_the_traffic() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    let room = Uuid::new_v4();
    let mut viewers: Vec<Subscriber> = join_all((0..4).map(|_| app.connect(room))).await;
    let before = app.metrics().await;
    assert_eq!(before["chat_sync_connections"], 4.0);
    assert_eq!(before["chat_sync_sessions"], 1.0);

    publish_paced(&redis, room, 0..100).await;
    for viewer in &mut viewers {
        viewer.messages(100).await;
    }
    let m = app.metrics().await;
    assert_eq!(m["chat_sync_messages_received_total"], 100.0);
    assert_eq!(m["chat_sync_usage_captured_total"], 100.0);
    assert_eq!(m["chat_sync_messages_delivered_total"], 400.0);
    let batches = m["chat_sync_batches_total"];
    assert_eq!(batches, viewers[0].batches as f64);
    assert_eq!(m["chat_sync_events_delivered_total"], 4.0 * batches);
    assert_eq!(m["chat_sync_batch_size_count"], batches);
    assert_eq!(m["chat_sync_batch_size_sum"], 100.0);
    assert!(m["chat_sync_tick_duration_seconds_count"] > 0.0);
    assert!(m["chat_sync_bytes_delivered_total"] > 4.0 * 100.0 * 50.0);
    assert_eq!(
        m.get("chat_sync_billing_pending"),
        Some(&0.0),
        "no tenant: nothing pending"
    );

    let oversize = format!("\"{}\"", "x".repeat(20_000));
    redis.publish(&room.to_string(), &oversize).await;
    wait_until("the oversize payload is counted as dropped", || async {
        app.metric(r#"chat_sync_messages_dropped_total{reason="oversize"}"#)
            .await
            == 1.0
    })
    .await;

    drop(viewers);
    wait_until("the connections gauge follows disconnects", || async {
        app.metric("chat_sync_connections").await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_usage_store_is_reported() {
    let mut redis = RedisServer::start().await;
    let tenant = Tenant::start().await;
    let base = tenant.base_url();
    let vars = [
        ("TENANT_BASE_URL", base.as_str()),
        ("BILLING_FLUSH_MS", "50"),
    ];
    let app = TestApp::spawn(Some(&redis), &vars).await;
    let flushes = app.metric("chat_sync_billing_flushes_total").await;
    wait_until("a round ran against the store", || async {
        app.metric("chat_sync_billing_flushes_total").await > flushes
    })
    .await;
    assert_eq!(
        app.metric("chat_sync_billing_store_resets_total").await,
        0.0
    );
    redis.restart().await; // Without persistence: the store comes back empty.
    wait_until("the lost store is reported", || async {
        app.metric("chat_sync_billing_store_resets_total").await == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_whose_answer_is_lost_is_sent_again_with_the_same_key() {
    let redis = RedisServer::start().await;
    let tenant = Tenant::start().await;
    let base = tenant.base_url();
    let vars = [
        ("TENANT_BASE_URL", base.as_str()),
        ("BILLING_FLUSH_MS", "50"),
        ("BILLING_TIMEOUT_MS", "300"),
    ];
    let app = TestApp::spawn(Some(&redis), &vars).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    // The tenant counts the first report but answers after the client gave up.
    tenant.answer_late(1, Duration::from_secs(2));
    publish_paced(&redis, room, 0..100).await;
    viewer.messages(100).await;
    wait_until("the report was sent again", || async {
        tenant.repeats() >= 1
    })
    .await;
    publish_paced(&redis, room, 100..150).await;
    viewer.messages(50).await;
    assert_total_settles(&tenant, room, 150, &[&app]).await;
}

/// The bound the README states for a killed instance: it loses what it captured and had
/// not yet counted into the store (`chat_sync_billing_uncounted`), and only for messages
/// no other instance received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_only_what_it_had_not_counted_and_nobody_else_received() {
    let redis = RedisServer::start().await;
    let tenant = Tenant::start().await;
    let (url, base) = (redis.url(), tenant.base_url());
    // a never gets to count (its flush is an hour away); b counts every 50 ms.
    let env = |id, flush| {
        [
            ("REDIS_URL", url.as_str()),
            ("TENANT_BASE_URL", base.as_str()),
            ("BILLING_FLUSH_MS", flush),
            ("INSTANCE_ID", id),
        ]
    };
    let a = ServerProcess::spawn(&env("a", "3600000")).await;
    let b = ServerProcess::spawn(&env("b", "50")).await;
    let (shared, only_a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut on_a = Subscriber::connect(&a.url(&sse_path(shared)), None).await;
    let mut on_b = Subscriber::connect(&b.url(&sse_path(shared)), None).await;
    let mut alone = Subscriber::connect(&a.url(&sse_path(only_a)), None).await;
    publish_paced(&redis, shared, 0..100).await;
    publish_paced(&redis, only_a, 0..40).await;
    on_a.messages(100).await;
    on_b.messages(100).await;
    alone.messages(40).await;
    wait_until("a holds all 140 uncounted", || async {
        a.metric("chat_sync_billing_uncounted").await == 140.0
    })
    .await;
    drop(a); // SIGKILL

    wait_until("b billed the shared session", || async {
        tenant.total(shared) >= 100
    })
    .await;
    wait_billing_settled(|series| b.metric(series)).await;
    assert_eq!(
        tenant.total(shared),
        100,
        "b received them too: nothing lost"
    );
    assert_eq!(
        tenant.total(only_a),
        0,
        "lost: exactly what a had not counted"
    );
}
