//! A viewer's position means the same on every instance (`docs/positions.md`): a
//! viewer that moves, because an instance restarted, died or shares its session,
//! resumes exactly where it was. Real processes, the real nginx, one redis-server.

use std::time::Duration;

use futures::future::join_all;
use uuid::Uuid;

use crate::common::fleet::{Browser, Fleet, Publisher, Seen};
use crate::common::nginx::deploy_config;
use crate::common::{RedisServer, Subscriber, TestApp, WAIT, batch, chat, sse_path, wait_until};

const SESSIONS: usize = 30;
const VIEWERS_PER_SESSION: usize = 10;
const RETRY: Duration = Duration::from_millis(200);

fn fleet_vars() -> Vec<(&'static str, &'static str)> {
    vec![
        ("TICK_MS", "24"),
        ("CLIENT_RETRY_MS", "200"),
        ("BILLING_FLUSH_MS", "200"),
        ("SHUTDOWN_HANDOVER_MS", "30000"),
        ("SESSION_GRACE_MS", "60000"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_resumes_exactly_on_an_instance_that_batched_differently() {
    let redis = RedisServer::start().await;
    // A batches every message on its own (its viewer paces the publisher); B, with a
    // one-second tick, batches many together, so A's positions fall inside B's batches.
    let a = TestApp::spawn(Some(&redis), &[("TICK_MS", "10")]).await;
    let b = TestApp::spawn(Some(&redis), &[("TICK_MS", "1000")]).await;
    let room = Uuid::new_v4();
    let mut on_a = a.connect(room).await;
    let mut on_b = b.connect(room).await;
    wait_until("both instances subscribed", || async {
        redis.numsub(&room.to_string()).await == 2
    })
    .await;
    for seq in 0..20 {
        redis.publish(&room.to_string(), &chat("p", seq)).await;
        assert_eq!(on_a.messages(1).await, vec![chat("p", seq)]);
    }
    let position = on_a.last_event_id.clone().expect("batches carry ids");
    drop(on_a);
    for seq in 20..40 {
        redis.publish(&room.to_string(), &chat("p", seq)).await;
    }
    let expected: Vec<String> = (0..40).map(|s| chat("p", s)).collect();
    assert_eq!(on_b.messages(40).await, expected, "B got everything too");

    let mut moved = Subscriber::connect(&b.url(&sse_path(room)), Some(&position)).await;
    assert_eq!(moved.status, 200);
    assert_eq!(
        moved.messages(20).await,
        expected[20..].to_vec(),
        "exactly what it missed, no reset"
    );
    for seq in 40..45 {
        redis.publish(&room.to_string(), &chat("p", seq)).await;
    }
    let live: Vec<String> = (40..45).map(|s| chat("p", s)).collect();
    assert_eq!(moved.messages(5).await, live, "then live");

    // An id of the form earlier versions sent is unknown: `reset`, never an error.
    let mut old = Subscriber::connect(&b.url(&sse_path(room)), Some("00000000000000ab-7")).await;
    assert_eq!(old.status, 200);
    assert_eq!(old.next_event().await.unwrap().event, "reset");
}

/// Opens `per_session` browsers on each session through nginx and waits until each
/// got its response (then it is subscribed: what is published from now on reaches it).
async fn open_browsers(fleet: &Fleet, rooms: &[Uuid], per_session: usize) -> Vec<(usize, Browser)> {
    let browsers: Vec<(usize, Browser)> = (0..rooms.len() * per_session)
        .map(|i| {
            let room = i / per_session;
            (room, Browser::open(fleet.stream_url(rooms[room]), RETRY))
        })
        .collect();
    wait_until("every browser is connected", || async {
        browsers
            .iter()
            .all(|(_, b)| !b.landed.lock().unwrap().is_empty())
    })
    .await;
    let _ = fleet;
    browsers
}

/// The fleet with `vars`, `SESSIONS` sessions of `VIEWERS_PER_SESSION` browsers each,
/// and a tenant publishing 150 msg/s; returns once every browser got a message (one
/// that got nothing yet has no id to resume from: it would start afresh).
async fn chat_going(vars: &[(&str, &str)]) -> (Fleet, Vec<Uuid>, Vec<(usize, Browser)>, Publisher) {
    let fleet = Fleet::start(&deploy_config(), vars).await;
    let rooms: Vec<Uuid> = (0..SESSIONS).map(|_| Uuid::new_v4()).collect();
    let browsers = open_browsers(&fleet, &rooms, VIEWERS_PER_SESSION).await;
    let publisher = Publisher::start(fleet.redis.url(), rooms.clone(), 150);
    wait_until("the chat is going", || async {
        browsers.iter().all(|(_, b)| b.latest().is_some())
    })
    .await;
    (fleet, rooms, browsers, publisher)
}

/// Waits until every browser is connected again and a further second of the chat
/// (150 messages after `before`) went out.
async fn back_and_chatting(
    fleet: &Fleet,
    browsers: &[(usize, Browser)],
    publisher: &Publisher,
    before: u64,
) {
    /// What was last seen, shown if the wait fails.
    struct Shown<'a>(std::sync::Mutex<String>, &'a Fleet);
    impl Drop for Shown<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("last seen: {}", self.0.lock().unwrap());
                eprintln!("nginx: {}", self.1.nginx.error_log_tail(30));
            }
        }
    }
    let shown = Shown(Default::default(), fleet);
    wait_until("the browsers are back and the chat goes on", || async {
        let per_instance = fleet.connections_per_instance().await;
        let mut refused = Vec::new();
        for p in fleet.instances.iter().flatten() {
            let text = crate::common::get(p.url("/metrics"))
                .await
                .unwrap()
                .text()
                .await;
            refused.push(
                text.unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("chat_sync_connections_rejected_total"))
                    .map(String::from)
                    .collect::<Vec<_>>(),
            );
        }
        let sent = publisher.sent.load(std::sync::atomic::Ordering::Relaxed);
        let mut doing = std::collections::BTreeMap::new();
        for (_, b) in browsers {
            let now = (
                b.doing.lock().unwrap().clone(),
                b.landed.lock().unwrap().last().cloned(),
            );
            *doing.entry(now).or_insert(0) += 1;
        }
        *shown.0.lock().unwrap() = format!(
            "streams per instance {per_instance:?}, sent {sent} of {before} + 150, \
             browsers (doing, last landed on): {doing:?}, refused: {refused:?}"
        );
        per_instance.iter().sum::<f64>() == (SESSIONS * VIEWERS_PER_SESSION) as f64
            && sent > before + 150
    })
    .await;
}

/// Stops publishing, waits until every browser got its session's last message, and
/// returns what each saw with the number published to its session.
async fn finish(
    publisher: Publisher,
    browsers: Vec<(usize, Browser)>,
) -> (Vec<(usize, u64)>, Vec<(usize, Vec<String>, Vec<Seen>)>) {
    let counts = publisher.stop().await;
    let behind = || {
        browsers
            .iter()
            .filter(|(room, b)| b.latest() != Some(counts[*room].0 - 1))
            .map(|(room, b)| {
                let doing = b.doing.lock().unwrap().clone();
                let landed = b.landed.lock().unwrap().clone();
                (*room, b.latest(), counts[*room].0, doing, landed)
            })
            .collect::<Vec<_>>()
    };
    /// Shows the browsers still behind if the wait fails.
    struct Behind<F: Fn() -> Vec<(usize, Option<usize>, usize, String, Vec<String>)>>(F);
    impl<F: Fn() -> Vec<(usize, Option<usize>, usize, String, Vec<String>)>> Drop for Behind<F> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "behind (session, latest, published, doing, landed): {:?}",
                    (self.0)()
                );
            }
        }
    }
    let shown = Behind(behind);
    wait_until("every browser got its session's last message", || async {
        (shown.0)().is_empty()
    })
    .await;
    drop(shown);
    let seen = join_all(browsers.into_iter().map(|(room, b)| async move {
        let landed = b.landed.lock().unwrap().clone();
        (room, landed, b.close().await)
    }))
    .await;
    (counts, seen)
}

fn exact(n: usize) -> Vec<Seen> {
    (0..n).map(Seen::Message).collect()
}

/// Waits until the tenant was billed `expected` per session, then two more report
/// rounds on every instance, and checks nothing more came.
async fn billed_exactly(fleet: &Fleet, rooms: &[Uuid], expected: impl Fn(usize) -> u64) {
    wait_until("usage is reported", || async {
        rooms
            .iter()
            .enumerate()
            .all(|(i, r)| fleet.tenant.total(*r) >= expected(i))
    })
    .await;
    for p in fleet.instances.iter().flatten() {
        let rounds = p.metric("chat_sync_billing_flushes_total").await;
        wait_until("two more report rounds", || async {
            p.metric("chat_sync_billing_flushes_total").await >= rounds + 2.0
        })
        .await;
    }
    for (i, room) in rooms.iter().enumerate() {
        assert_eq!(
            fleet.tenant.total(*room),
            expected(i),
            "session {i} billed once per message; reports: {:?}",
            fleet.tenant.keyed_reports(*room)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_and_repeats_nothing() {
    let (mut fleet, rooms, browsers, publisher) = chat_going(&fleet_vars()).await;
    for i in 0..3 {
        let before = publisher.sent.load(std::sync::atomic::Ordering::Relaxed);
        fleet.restart(i).await;
        // Back before the next goes.
        back_and_chatting(&fleet, &browsers, &publisher, before).await;
    }
    let (counts, seen) = finish(publisher, browsers).await;
    let mut moved = 0;
    for (room, landed, seen) in &seen {
        moved += usize::from(landed.len() > 1);
        assert_eq!(
            *seen,
            exact(counts[*room].0),
            "session {room}: every message once, in order, no reset, across {landed:?}"
        );
    }
    assert!(moved > 0, "some browsers had to move");
    assert!(counts.iter().all(|(n, reached)| *n as u64 == *reached));
    billed_exactly(&fleet, &rooms, |i| counts[i].0 as u64).await;
    fleet.stopped_cleanly().await;
}

/// Kills one of three instances (`kill -9`) while the chat goes on, and brings it
/// back; returns, per browser, whether it was on the killed instance, with what it saw
/// and what was published to its session. Billing is checked: never doubled, exact for
/// the sessions of the other instances (and for all with `exact_billing`).
async fn kill_one(standby: bool) -> Vec<(bool, usize, Vec<Seen>)> {
    let mut vars = fleet_vars();
    if standby {
        vars.push(("HISTORY_STANDBY", "true"));
    }
    let (mut fleet, rooms, browsers, publisher) = chat_going(&vars).await;
    fleet.kill_and_restart(1).await;
    let before = publisher.sent.load(std::sync::atomic::Ordering::Relaxed);
    back_and_chatting(&fleet, &browsers, &publisher, before).await;
    let (counts, seen) = finish(publisher, browsers).await;
    let killed_rooms: std::collections::HashSet<usize> = seen
        .iter()
        .filter(|(_, landed, _)| landed[0] == "inst-2")
        .map(|(room, ..)| *room)
        .collect();
    assert!(!killed_rooms.is_empty());
    // Usage is never doubled; what the killed instance had counted but not yet put in
    // the shared store is its only loss (README), so its sessions are checked for
    // "never more", the others for "exactly".
    billed_exactly(&fleet, &rooms, |i| {
        if killed_rooms.contains(&i) {
            fleet.tenant.total(rooms[i]).min(counts[i].1)
        } else {
            counts[i].1
        }
    })
    .await;
    for (i, room) in rooms.iter().enumerate() {
        assert!(
            fleet.tenant.total(*room) <= counts[i].1,
            "session {i} billed twice"
        );
    }
    seen.into_iter()
        .map(|(room, landed, seen)| (landed[0] == "inst-2", counts[room].0, seen))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_viewers_get_its_history_then_one_reset_at_the_gap() {
    let mut resets = 0;
    for (killed, n, seen) in kill_one(false).await {
        if !killed {
            assert_eq!(seen, exact(n), "not on the killed instance: exact");
            continue;
        }
        // Everything up to what the killed instance had written to the history, then
        // (if anything could be missing) one reset, then everything after the new
        // instance subscribed: never a repeat, never out of order.
        let at = seen
            .iter()
            .position(|s| *s == Seen::Reset)
            .unwrap_or(seen.len());
        resets += usize::from(at < seen.len());
        let (before, after) = (&seen[..at], &seen[(at + 1).min(seen.len())..]);
        assert_eq!(before.to_vec(), exact(before.len()), "a prefix: {seen:?}");
        let first = match after.first() {
            Some(Seen::Message(m)) => *m,
            _ => n,
        };
        assert!(first >= before.len(), "nothing twice: {seen:?}");
        assert_eq!(
            after.to_vec(),
            (first..n).map(Seen::Message).collect::<Vec<_>>(),
            "one reset at most, then a suffix: {seen:?}"
        );
    }
    assert!(
        resets > 0,
        "without a standby, nobody could vouch for the gap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_history_standby_a_killed_instances_viewers_resume_exactly() {
    for (killed, n, seen) in kill_one(true).await {
        assert_eq!(seen, exact(n), "killed instance's viewer: {killed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_session_spread_over_three_instances_reaches_every_viewer_once() {
    const VIEWERS: usize = 3000;
    const MESSAGES: usize = 20;
    let _ = rlimit::increase_nofile_limit(20_000);
    let room = Uuid::new_v4();
    // The documented hot-session mode: the session listed in the map.
    let conf = deploy_config().replace(
        "default  chat_sync_streams;",
        &format!("default  chat_sync_streams;\n        {room}  chat_sync_spread;"),
    );
    let mut vars = fleet_vars();
    vars.push(("MAX_STREAMS_PER_CLIENT", "100000"));
    let fleet = Fleet::start(&conf, &vars).await;
    let url = fleet.stream_url(room);
    let mut viewers = join_all((0..VIEWERS).map(|_| Subscriber::connect(&url, None))).await;
    assert!(viewers.iter().all(|v| v.status == 200));
    wait_until("every viewer is connected", || async {
        fleet.connections().await == VIEWERS as f64
    })
    .await;
    for p in fleet.instances.iter().flatten() {
        assert!(
            p.metric("chat_sync_connections").await > 0.0,
            "spread over all three"
        );
    }
    // A viewer that moves between instances mid-show.
    let (first, second) = (
        fleet.instances[0].as_ref().unwrap(),
        fleet.instances[1].as_ref().unwrap(),
    );
    let mut mover = Subscriber::connect(&first.url(&sse_path(room)), None).await;
    let expected: Vec<String> = (0..MESSAGES).map(|s| chat("p", s)).collect();
    for seq in 0..MESSAGES {
        fleet.redis.publish(&room.to_string(), &expected[seq]).await;
        if seq == MESSAGES / 2 {
            assert_eq!(mover.messages(seq + 1).await, expected[..=seq].to_vec());
            let position = mover.last_event_id.clone();
            mover = Subscriber::connect(&second.url(&sse_path(room)), position.as_deref()).await;
        }
    }
    assert_eq!(
        mover.messages(MESSAGES - MESSAGES / 2 - 1).await,
        expected[MESSAGES / 2 + 1..].to_vec(),
        "the moved viewer resumes exactly"
    );
    let got = join_all(viewers.iter_mut().map(|v| async {
        let mut got = Vec::new();
        while got.len() < MESSAGES {
            let event = tokio::time::timeout(WAIT, v.next_event())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(event.event, "message");
            got.extend(batch(&event));
        }
        got
    }))
    .await;
    assert!(
        got.iter().all(|g| *g == expected),
        "every viewer, every message, once"
    );
    billed_exactly(&fleet, &[room], |_| MESSAGES as u64).await;
}
