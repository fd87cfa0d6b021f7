//! Readiness says what it means: an instance that is busy but whose Redis answers stays
//! ready (a load balancer must not pull it out exactly when it is busiest), one with no
//! connection slot left is not, and how busy it is shows as runtime lag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use uuid::Uuid;

use crate::common::{RedisServer, TestApp, redis_conn, wait_until};

/// Tasks that compute for `slice` between yields, until `until`: every other task of
/// the runtime then waits about `count × slice ÷ workers` for each turn.
async fn saturate(count: usize, slice: Duration, until: Instant) {
    join_all((0..count).map(|_| {
        tokio::spawn(async move {
            while Instant::now() < until {
                let start = Instant::now();
                while start.elapsed() < slice {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        })
    }))
    .await;
}

/// Lag observations above `seconds` (the histogram's buckets double from 1 ms).
async fn lags_above(app: &TestApp, seconds: &str) -> f64 {
    let metrics = app.metrics().await;
    let count = metrics["chat_sync_runtime_lag_seconds_count"];
    let below = metrics[&format!("chat_sync_runtime_lag_seconds_bucket{{le=\"{seconds}\"}}")];
    count - below
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_runtime_stays_ready_while_redis_answers() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    // From a thread and runtime of their own, so that they act on time whatever the
    // server's runtime is doing: questions to `/readyz` every 50 ms (answered when the
    // server can), and Redis made to answer every command 1.5 s late, now and then, as
    // replies are late when the runtime that reads them is this busy.
    let (url, redis_url) = (app.url("/readyz"), redis.url());
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let http = reqwest::Client::new();
                let mut conn = redis_conn(&redis_url).await;
                let mut answers = Vec::new();
                let mut paused = Instant::now() - Duration::from_secs(60);
                while !stop.load(Ordering::Acquire) {
                    if paused.elapsed() > Duration::from_millis(1600) {
                        paused = Instant::now();
                        let _: () = redis::cmd("CLIENT")
                            .arg("PAUSE")
                            .arg(1500)
                            .arg("ALL")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                    }
                    answers.push(http.get(&url).send().await.map(|r| r.status().as_u16()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answers
            })
        })
    };
    // Each of the server's tasks (the one reading Redis's replies among them) waits
    // seconds for its turn, as in a fan-out far beyond what the machine can do.
    saturate(
        96,
        Duration::from_millis(50),
        Instant::now() + Duration::from_secs(5),
    )
    .await;
    // The runtime is free again: the health check's late PING has been judged by now
    // (it used to be a 503 for half a second), and the lag is on record.
    wait_until(
        "a runtime lag of more than a second was measured",
        || async { lags_above(&app, "1.024").await >= 1.0 },
    )
    .await;
    let probes = || async { app.metrics().await["chat_sync_runtime_lag_seconds_count"] };
    let settled = probes().await;
    wait_until("the lag probe ran ten more times", || async {
        probes().await >= settled + 10.0
    })
    .await;
    stop.store(true, Ordering::Release);
    let answers = prober.join().unwrap();
    assert!(
        answers.len() >= 5,
        "the prober asked only {} times",
        answers.len()
    );
    for answer in &answers {
        assert!(
            matches!(answer, Ok(200)),
            "/readyz answered {answer:?} while Redis was fine: {answers:?}"
        );
    }
    let body: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
    assert!(body["runtimeLagMs"].is_u64(), "{body}");
}

#[tokio::test]
async fn an_instance_with_no_connection_slot_left_is_not_ready() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("MAX_CONNECTIONS", "2")]).await;
    let room = Uuid::new_v4();
    let first = app.connect(room).await;
    assert_eq!(app.get("/readyz").await.status(), 200, "one slot is left");
    let second = app.connect(room).await;
    let full = app.get("/readyz").await;
    assert_eq!(full.status(), 503);
    let body: serde_json::Value = full.json().await.unwrap();
    assert_eq!(
        body["unavailable"],
        serde_json::json!(["connection limit reached"])
    );
    assert_eq!(body["brokerConnected"], true);
    drop(second);
    wait_until("a slot is free and the instance ready again", || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    drop(first);
}
