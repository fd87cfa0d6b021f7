//! Three chat-sync processes behind the real nginx (`deploy/nginx.conf`, or the
//! documented variant of it), one redis-server and a tenant: what an operator runs.
//! Instances are restarted on their own port (nginx knows them by address), stopped
//! with SIGTERM or killed with SIGKILL; viewers behave like browsers' EventSource.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use super::nginx::Nginx;
use super::tenant::Tenant;
use super::{RedisServer, ServerProcess, Subscriber, batch, chat, free_port, patient, seq_of};

pub struct Fleet {
    pub redis: RedisServer,
    pub tenant: Tenant,
    pub nginx: Nginx,
    ports: Vec<u16>,
    vars: Vec<(String, String)>,
    pub instances: Vec<Option<ServerProcess>>,
    /// Stopped with SIGTERM, still handing over: waited for at the end.
    stopping: Vec<ServerProcess>,
}

impl Fleet {
    /// Three instances with `vars`, behind nginx running `conf` (the deploy file, or
    /// a variant of it).
    pub async fn start(conf: &str, vars: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start().await;
        let tenant = Tenant::start().await;
        let mut vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vars.push(("REDIS_URL".into(), redis.url()));
        vars.push(("TENANT_BASE_URL".into(), tenant.base_url()));
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut fleet = Self {
            nginx: Nginx::start_with(
                conf,
                &ports
                    .iter()
                    .map(|p| format!("127.0.0.1:{p}"))
                    .collect::<Vec<_>>(),
            ),
            redis,
            tenant,
            ports,
            vars,
            instances: vec![None, None, None],
            stopping: Vec::new(),
        };
        for i in 0..3 {
            fleet.launch(i).await;
        }
        fleet
    }

    async fn launch(&mut self, i: usize) {
        let name = format!("inst-{}", i + 1);
        let mut vars: Vec<(&str, &str)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        vars.push(("INSTANCE_ID", &name));
        self.instances[i] = Some(ServerProcess::spawn_on(self.ports[i], &vars).await);
    }

    /// SIGTERM to instance `i`, and a new process on its port once the old one let
    /// go of it; returns when the new one is ready (the old one may still be handing
    /// its sessions over).
    pub async fn restart(&mut self, i: usize) {
        let old = self.instances[i].take().expect("running");
        old.terminate();
        self.stopping.push(old);
        // Until the old process closes its listener it would answer the new one's
        // readiness probe.
        let port = self.ports[i];
        super::wait_until("the stopping instance lets go of its port", || async move {
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        })
        .await;
        self.launch(i).await;
    }

    /// `kill -9` of instance `i`, then a new process on its port.
    pub async fn kill_and_restart(&mut self, i: usize) {
        let mut killed = self.instances[i].take().expect("running");
        killed.kill();
        killed.wait_exit().await;
        self.launch(i).await;
    }

    /// Open streams over all running instances.
    pub async fn connections(&self) -> f64 {
        self.connections_per_instance().await.iter().sum()
    }

    /// Open streams on each running instance.
    pub async fn connections_per_instance(&self) -> Vec<f64> {
        let mut counts = Vec::new();
        for p in self.instances.iter().flatten() {
            counts.push(p.metric("chat_sync_connections").await);
        }
        counts
    }

    /// Every instance stopped with SIGTERM exited cleanly.
    pub async fn stopped_cleanly(&mut self) {
        for mut p in self.stopping.drain(..) {
            assert_eq!(p.wait_exit().await, Some(0));
        }
    }

    pub fn stream_url(&self, session: Uuid) -> String {
        self.nginx.url(&super::sse_path(session))
    }
}

/// What a viewer saw, across its reconnects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Message(usize),
    Reset,
    Other(String),
}

/// A viewer that behaves like a browser's EventSource: on a closed stream or a failed
/// connect it reconnects (after `retry`) with the id of the last event it got.
pub struct Browser {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The instance each connection landed on (`X-Instance-Id`), in order.
    pub landed: Arc<Mutex<Vec<String>>>,
    /// What it is doing now, for a failing test to show.
    pub doing: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Browser {
    pub fn open(url: String, retry: Duration) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let landed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let doing = Arc::new(Mutex::new(String::from("starting")));
        let task = tokio::spawn({
            let (seen, landed, stop, doing) =
                (seen.clone(), landed.clone(), stop.clone(), doing.clone());
            async move {
                let mut last: Option<String> = None;
                while !stop.load(Ordering::Acquire) {
                    *doing.lock().unwrap() = "connecting".into();
                    let mut viewer = match Subscriber::try_connect(&url, last.as_deref()).await {
                        Ok(v) if v.status == 200 => v,
                        other => {
                            *doing.lock().unwrap() = match other {
                                Ok(v) => format!("retrying after {}", v.status),
                                Err(e) => format!("retrying after {e}"),
                            };
                            tokio::time::sleep(retry).await;
                            continue;
                        }
                    };
                    let at = viewer
                        .headers
                        .get("x-instance-id")
                        .map(|h| h.to_str().unwrap_or(""));
                    landed.lock().unwrap().push(at.unwrap_or("").to_string());
                    *doing.lock().unwrap() = "reading".into();
                    while !stop.load(Ordering::Acquire) {
                        let event = match viewer.next_event_within(Duration::from_millis(200)).await
                        {
                            None => continue,
                            Some(None) => break,
                            Some(Some(event)) => event,
                        };
                        last = viewer.last_event_id.clone();
                        let mut seen = seen.lock().unwrap();
                        match event.event.as_str() {
                            "message" => seen
                                .extend(batch(&event).iter().map(|p| Seen::Message(seq_of(p).1))),
                            "reset" => seen.push(Seen::Reset),
                            "shutdown" => {}
                            other => seen.push(Seen::Other(other.to_string())),
                        }
                    }
                    *doing.lock().unwrap() = "closed, waiting to reconnect".into();
                    tokio::time::sleep(retry).await;
                }
            }
        });
        Self {
            seen,
            landed,
            doing,
            stop,
            task,
        }
    }

    /// The highest message number seen so far.
    pub fn latest(&self) -> Option<usize> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|s| match s {
                Seen::Message(n) => Some(*n),
                _ => None,
            })
    }

    pub async fn close(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap();
        self.seen.lock().unwrap().clone()
    }
}

/// A tenant publishing to Redis round-robin over `sessions` at `rate` messages per
/// second, each payload unique (numbered per session), until stopped.
pub struct Publisher {
    /// Per session: how many were published, and how many reached an instance.
    counts: Arc<Mutex<Vec<(usize, u64)>>>,
    stop: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub fn start(redis_url: String, sessions: Vec<Uuid>, rate: u64) -> Self {
        let counts = Arc::new(Mutex::new(vec![(0usize, 0u64); sessions.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (counts, stop, sent) = (counts.clone(), stop.clone(), sent.clone());
            async move {
                let client = redis::Client::open(redis_url).unwrap();
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&patient())
                    .await
                    .unwrap();
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                let mut next = 0;
                while !stop.load(Ordering::Acquire) {
                    tick.tick().await;
                    next = (next + 1) % sessions.len();
                    let seq = counts.lock().unwrap()[next].0;
                    let receivers: u64 = redis::AsyncCommands::publish(
                        &mut conn,
                        sessions[next].to_string(),
                        chat(&format!("s{next}"), seq),
                    )
                    .await
                    .unwrap();
                    let mut counts = counts.lock().unwrap();
                    counts[next].0 += 1;
                    counts[next].1 += u64::from(receivers > 0);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            counts,
            stop,
            sent,
            task,
        }
    }

    /// Stops; per session, how many were published and how many reached an instance.
    pub async fn stop(self) -> Vec<(usize, u64)> {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap();
        self.counts.lock().unwrap().clone()
    }
}
