//! Scaling out: three instances behind the real nginx with `deploy/nginx.conf` (only
//! the upstream addresses and the listen port substituted), routing by session id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use uuid::Uuid;

use crate::common::{RedisServer, Subscriber, TestApp, free_port, sse_path, wait_until};

/// nginx running `deploy/nginx.conf` in the foreground, in its own prefix directory.
struct Nginx {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(upstreams: &[String]) -> Self {
        let conf =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .expect("deploy/nginx.conf");
        for _ in 0..10 {
            let port = free_port();
            let mut text = conf.replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
            for (i, upstream) in upstreams.iter().enumerate() {
                let name = format!("chat-sync-{}:8080", i + 1);
                assert!(text.contains(&name), "{name} in deploy/nginx.conf");
                text = text.replace(&name, upstream);
            }
            let dir = std::env::temp_dir().join(format!("chat-sync-nginx-{}", Uuid::new_v4()));
            std::fs::create_dir_all(dir.join("logs")).unwrap();
            let path = dir.join("nginx.conf");
            std::fs::write(&path, text).unwrap();
            let globals = format!(
                "daemon off; pid {0}/nginx.pid; error_log {0}/logs/error.log warn;",
                dir.display()
            );
            let mut child = Command::new(nginx_binary())
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&path)
                .arg("-g")
                .arg(globals)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("nginx must be installed (scripts/test.sh installs it)");
            for _ in 0..200 {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { port, child, dir };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nginx did not start");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers before it exits (a SIGKILL would
    /// leave the workers running, holding the port).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> String {
    [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .iter()
    .find(|p| std::path::Path::new(p).exists())
    .map(|p| p.to_string())
    .unwrap_or_else(|| "nginx".into())
}

fn instance(viewer: &Subscriber) -> String {
    viewer.headers["x-instance-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Publishes one timestamped message per session and returns each viewer's latency.
async fn publish_and_measure(
    redis: &RedisServer,
    rooms: &[Uuid],
    viewers: &mut [(usize, Subscriber)],
) -> Vec<Duration> {
    let start = Instant::now();
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
            start.elapsed()
        }
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_keeps_each_session_on_one_instance_and_moves_only_a_dead_ones_sessions() {
    const SESSIONS: usize = 200;
    const TICK_MS: u64 = 24;
    let redis = RedisServer::start().await;
    let mut apps = Vec::new();
    for i in 1..=3 {
        let id = format!("inst-{i}");
        let vars = [("INSTANCE_ID", id.as_str()), ("TICK_MS", "24")];
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

    let latencies = publish_and_measure(&redis, &rooms, &mut viewers).await;
    let mut sorted = latencies.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    eprintln!(
        "through nginx: {} viewers, latency median {median:?}, max {:?}",
        sorted.len(),
        sorted[sorted.len() - 1]
    );
    assert!(
        median < Duration::from_millis(TICK_MS + 30),
        "median {median:?}: nginx must not buffer the stream"
    );

    // Stop inst-2: its viewers reconnect (as EventSource does) and land elsewhere.
    let gone = "inst-2";
    apps[1].take().unwrap().stop().await;
    let mut moved: HashMap<usize, String> = HashMap::new();
    for (room, viewer) in viewers.iter_mut() {
        if placed[room] != gone {
            continue;
        }
        assert_eq!(viewer.next_event().await.unwrap().event, "shutdown");
        assert!(viewer.next_event().await.is_none());
        let last = viewer.last_event_id.clone();
        let url = nginx.url(&sse_path(rooms[*room]));
        *viewer = Subscriber::connect(&url, last.as_deref()).await;
        assert_eq!(viewer.status, 200);
        let now_at = instance(viewer);
        assert_ne!(now_at, gone);
        let first = moved.entry(*room).or_insert_with(|| now_at.clone());
        assert_eq!(
            *first, now_at,
            "a moved session still lands on one instance"
        );
        // The new instance has no history for this viewer's id: it says so first.
        assert_eq!(viewer.next_event().await.unwrap().event, "reset");
    }
    assert!(!moved.is_empty());
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
    let after = publish_and_measure(&redis, &rooms, &mut viewers).await;
    assert_eq!(after.len(), SESSIONS * 3, "everyone keeps receiving");
}
