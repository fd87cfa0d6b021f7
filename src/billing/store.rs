//! Where usage is counted before it is reported: shared by every instance (in Redis),
//! so that each message is billed once however many instances received it, and
//! usage that one instance counted is billed even if that instance dies.
//!
//! Per session (keys share the session's hash tag, so one slot holds them, on a
//! Cluster too):
//! - `seen`: the fingerprints counted in the last window (a sorted set by time);
//!   counting a fingerprint that is already there adds nothing.
//! - `usage`: a hash with `pending` (counted, not yet reported) and one
//!   `inflight:<owner>` per instance with a report in flight.
//!
//! Reporting takes `pending` into the taker's `inflight` field; the tenant's answer
//! either settles it (dropped) or gives it back to `pending`. Instances note their
//! liveness in one hash (`alive`: owner → deadline); an in-flight count whose owner's
//! deadline has passed (it died mid-report) is given back by the next taker. Only an
//! owner listed with a past deadline is dead: the list is read before the take, and
//! an instance that started in between, and took meanwhile, is not listed yet (taking
//! "not listed alive" for dead gave a new instance's first report to another instance
//! as well, and the tenant was billed twice). The dead stay listed for `DEAD_RETAIN`.
//!
//! Sessions with anything unsettled are listed in one set, so that any instance can
//! settle usage left by an instance that is gone. Scripts touch only one session's
//! keys (on a Cluster that set lives in another slot), so the set is kept by separate
//! commands, in an order that never leaves unsettled usage unlisted: a counter adds
//! the session before and after counting, and whoever finds a session settled
//! removes it, then looks again and adds it back if usage appeared meanwhile.
//!
//! Under Sentinel or on a Cluster, each write waits (`WAIT`) until a replica has it
//! before anything acts on it, so that a failover keeps every count: a report is
//! never sent for a take the new master would not know.
//!
//! Without Redis (one instance), the same operations run on a map in memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::{Pipeline, Value};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::scripts::{ACCOUNT, ALIVE, GIVE_BACK, SETTLE, TAKE};
use crate::topology::{Link, LinkOptions, Redis, Topology, within};

/// Sessions with unsettled usage looked at per round, besides this instance's own.
const SWEEP: usize = 32;
const UNSETTLED_KEY: &str = "chat-sync:billing:unsettled";
/// Set by the first instance to use a Redis; gone after a Redis restart that lost the
/// store (no persistence), which instances notice and report.
const EPOCH_KEY: &str = "chat-sync:billing:epoch";
const ALIVE_KEY: &str = "chat-sync:billing:alive";
/// How long a dead instance stays listed as dead, so that what it left in flight is
/// given back: every round samples unsettled sessions, so far less would do.
const DEAD_RETAIN: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a write waits for a replica (under Sentinel or on a Cluster). A replica
/// acknowledges within a millisecond or two; one that is down (after a failover, until
/// the old master comes back as a replica) costs this per step of a round, and
/// exactness across a second failover meanwhile.
const REPLICA_WAIT_MS: u64 = 200;

fn seen_key(session: Uuid) -> String {
    format!("chat-sync:billing:{{{session}}}:seen")
}

fn usage_key(session: Uuid) -> String {
    format!("chat-sync:billing:{{{session}}}:usage")
}

pub enum UsageStore {
    /// Single instance (in-process broker): pending and in-flight counts per session.
    Local(Mutex<HashMap<Uuid, (u64, u64)>>),
    Redis {
        conn: Link,
        /// Unique per process, so a restarted instance never mistakes an old
        /// in-flight count for its own.
        owner: String,
        /// How long this instance's liveness key lives without being refreshed.
        alive_ttl: Duration,
        /// The store's epoch as last seen; a different one means it lost its state.
        epoch: Mutex<Option<String>>,
        /// Writes wait for a replica (under Sentinel or on a Cluster).
        replicated: bool,
    },
}

/// What counting did.
pub struct Accounted {
    /// How many fingerprints of each batch were new.
    pub added: Vec<u64>,
    /// The store lost its state since the last call (Redis restarted without
    /// persistence): usage it held unreported is gone.
    pub store_reset: bool,
}

impl UsageStore {
    pub fn local() -> Self {
        Self::Local(Mutex::new(HashMap::new()))
    }

    pub fn redis(
        redis: &Redis,
        tasks: &TaskTracker,
        owner: String,
        alive_ttl: Duration,
    ) -> redis::RedisResult<Self> {
        let conn = redis.link(
            LinkOptions {
                push: None,
                response_timeout: Some(
                    Duration::from_secs(2) + Duration::from_millis(REPLICA_WAIT_MS),
                ),
            },
            tasks,
        )?;
        Ok(Self::Redis {
            conn,
            owner,
            alive_ttl,
            epoch: Mutex::new(None),
            replicated: !matches!(redis.topology(), Topology::Single(_)),
        })
    }

    /// Refreshes this instance's liveness and counts `batches` of fingerprints;
    /// returns how many of each batch were new (not counted by anyone before).
    pub async fn account(
        &self,
        batches: &[(Uuid, Vec<u64>)],
        window: Duration,
    ) -> redis::RedisResult<Accounted> {
        let (conn, owner, alive_ttl, epoch, replicated) = match self {
            Self::Local(map) => {
                let mut map = map.lock().unwrap();
                let added = batches
                    .iter()
                    .map(|(session, fps)| {
                        map.entry(*session).or_default().0 += fps.len() as u64;
                        fps.len() as u64
                    })
                    .collect();
                return Ok(Accounted {
                    added,
                    store_reset: false,
                });
            }
            Self::Redis {
                conn,
                owner,
                alive_ttl,
                epoch,
                replicated,
            } => (conn, owner, alive_ttl, epoch, *replicated),
        };
        let sessions: Vec<Uuid> = batches.iter().map(|(s, _)| *s).collect();
        let mut epoch_pipe = redis::pipe();
        epoch_pipe
            .cmd("SET")
            .arg(EPOCH_KEY)
            .arg(format!("{owner}-{:x}", rand_suffix()))
            .arg("NX")
            .ignore();
        epoch_pipe.cmd("GET").arg(EPOCH_KEY);
        let mut alive_pipe = liveness(owner, *alive_ttl);
        alive_pipe.ignore();
        let mut pipes = vec![epoch_pipe, alive_pipe];
        pipes.extend(list_unsettled(&sessions, replicated));
        let mut replies: Vec<Vec<Value>> = run_each(conn, &pipes).await?;
        let current: String = redis::from_redis_value(
            replies
                .first_mut()
                .and_then(|r| r.pop())
                .unwrap_or(Value::Nil),
        )?;
        let counts: Vec<Pipeline> = batches
            .iter()
            .map(|(session, fps)| {
                let mut pipe = redis::pipe();
                let mut args = vec![window.as_millis().to_string()];
                args.extend(fps.iter().map(|fp| format!("{fp:016x}")));
                eval(
                    &mut pipe,
                    ACCOUNT,
                    &[seen_key(*session), usage_key(*session)],
                    &args,
                );
                replicate(&mut pipe, replicated);
                pipe
            })
            .collect();
        let added: Vec<(u64,)> = run_each(conn, &counts).await?;
        let added: Vec<u64> = added.into_iter().map(|(n,)| n).collect();
        let counted: Vec<Uuid> = sessions
            .iter()
            .zip(&added)
            .filter(|(_, n)| **n > 0)
            .map(|(s, _)| *s)
            .collect();
        run_each::<()>(conn, list_unsettled(&counted, replicated).as_slice()).await?;
        let previous = epoch.lock().unwrap().replace(current.clone());
        Ok(Accounted {
            added,
            store_reset: previous.is_some_and(|p| p != current),
        })
    }

    /// Takes what is pending for each of `sessions` for this instance to report, with
    /// what dead instances left in flight.
    pub async fn take(&self, sessions: &[Uuid]) -> redis::RedisResult<Vec<u64>> {
        let dead = self.dead_owners().await?;
        self.take_given(sessions, &dead).await
    }

    /// The instances whose liveness deadline has passed.
    async fn dead_owners(&self) -> redis::RedisResult<Vec<String>> {
        let Self::Redis { conn, owner, .. } = self else {
            return Ok(Vec::new());
        };
        let (dead,): (Vec<String>,) = run(conn, &liveness(owner, Duration::ZERO)).await?;
        Ok(dead)
    }

    /// [`UsageStore::take`] with the dead instances as listed earlier.
    async fn take_given(&self, sessions: &[Uuid], dead: &[String]) -> redis::RedisResult<Vec<u64>> {
        match self {
            Self::Local(map) => {
                let mut map = map.lock().unwrap();
                Ok(sessions
                    .iter()
                    .map(|s| {
                        let entry = map.entry(*s).or_default();
                        entry.1 += std::mem::take(&mut entry.0);
                        let n = entry.1;
                        if n == 0 {
                            map.remove(s);
                        }
                        n
                    })
                    .collect())
            }
            Self::Redis {
                conn,
                owner,
                replicated,
                ..
            } => {
                let mut args = vec![owner.clone()];
                args.extend(dead.iter().cloned());
                per_session(conn, *replicated, TAKE, sessions, &args).await
            }
        }
    }

    /// The tenant answered these reports for good (accepted, or unknown session).
    pub async fn settle(&self, sessions: &[Uuid]) -> redis::RedisResult<()> {
        self.finish(sessions, SETTLE, |entry| entry.1 = 0).await
    }

    /// These reports failed: their counts are pending again.
    pub async fn give_back(&self, sessions: &[Uuid]) -> redis::RedisResult<()> {
        self.finish(sessions, GIVE_BACK, |entry| {
            entry.0 += std::mem::take(&mut entry.1)
        })
        .await
    }

    /// Some sessions with unsettled usage, whoever counted it: usage of an instance
    /// that died or stopped is settled by the others (or by its next start).
    pub async fn unsettled_sample(&self) -> redis::RedisResult<Vec<Uuid>> {
        match self {
            Self::Local(map) => Ok(map.lock().unwrap().keys().copied().collect()),
            Self::Redis { conn, .. } => {
                let mut pipe = redis::pipe();
                pipe.cmd("SRANDMEMBER").arg(UNSETTLED_KEY).arg(SWEEP);
                let (ids,): (Vec<String>,) = run(conn, &pipe).await?;
                Ok(ids
                    .iter()
                    .filter_map(|id| Uuid::try_parse(id).ok())
                    .collect())
            }
        }
    }

    async fn finish(
        &self,
        sessions: &[Uuid],
        script: &str,
        local: impl Fn(&mut (u64, u64)),
    ) -> redis::RedisResult<()> {
        match self {
            Self::Local(map) => {
                let mut map = map.lock().unwrap();
                for s in sessions {
                    local(map.entry(*s).or_default());
                }
                Ok(())
            }
            Self::Redis {
                conn,
                owner,
                replicated,
                ..
            } => per_session(
                conn,
                *replicated,
                script,
                sessions,
                std::slice::from_ref(owner),
            )
            .await
            .map(drop),
        }
    }
}

/// Runs `script` on each session's usage; returns each one's count, and takes the
/// sessions it found settled off the unsettled list.
async fn per_session(
    conn: &Link,
    replicated: bool,
    script: &str,
    sessions: &[Uuid],
    args: &[String],
) -> redis::RedisResult<Vec<u64>> {
    let pipes: Vec<Pipeline> = sessions
        .iter()
        .map(|&s| {
            let mut pipe = redis::pipe();
            eval(&mut pipe, script, &[usage_key(s)], args);
            replicate(&mut pipe, replicated);
            pipe
        })
        .collect();
    let replies: Vec<((u64, u8),)> = run_each(conn, &pipes).await?;
    let settled: Vec<Uuid> = sessions
        .iter()
        .zip(&replies)
        .filter(|(_, ((_, settled),))| *settled == 1)
        .map(|(s, _)| *s)
        .collect();
    if !settled.is_empty() {
        let mut pipe = redis::pipe();
        pipe.cmd("SREM")
            .arg(UNSETTLED_KEY)
            .arg(ids(&settled))
            .ignore();
        run::<()>(conn, &pipe).await?;
        // Counted by another instance between our script and the SREM: list it again.
        let checks: Vec<Pipeline> = settled
            .iter()
            .map(|&s| {
                let mut pipe = redis::pipe();
                pipe.cmd("EXISTS").arg(usage_key(s));
                pipe
            })
            .collect();
        let exists: Vec<(u8,)> = run_each(conn, &checks).await?;
        let back: Vec<Uuid> = settled
            .iter()
            .zip(exists)
            .filter(|(_, (e,))| *e == 1)
            .map(|(s, _)| *s)
            .collect();
        run_each::<()>(conn, list_unsettled(&back, replicated).as_slice()).await?;
    }
    Ok(replies.into_iter().map(|((n, _),)| n).collect())
}

/// The liveness script: notes `owner` alive for `ttl` (zero: only reads), and answers
/// with the instances whose deadline has passed.
fn liveness(owner: &str, ttl: Duration) -> Pipeline {
    let mut pipe = redis::pipe();
    eval(
        &mut pipe,
        ALIVE,
        &[ALIVE_KEY.into()],
        &[
            owner.to_string(),
            ttl.as_millis().to_string(),
            DEAD_RETAIN.as_millis().to_string(),
        ],
    );
    pipe
}

/// Adds `sessions` to the unsettled list (nothing for none).
fn list_unsettled(sessions: &[Uuid], replicated: bool) -> Option<Pipeline> {
    if sessions.is_empty() {
        return None;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("SADD")
        .arg(UNSETTLED_KEY)
        .arg(ids(sessions))
        .ignore();
    replicate(&mut pipe, replicated);
    Some(pipe)
}

/// Ends a pipeline of writes with a wait for one replica, when there are replicas.
/// On a Cluster the wait goes with the pipeline to the node of its key.
fn replicate(pipe: &mut Pipeline, replicated: bool) {
    if replicated {
        pipe.cmd("WAIT").arg(1).arg(REPLICA_WAIT_MS).ignore();
    }
}

fn ids(sessions: &[Uuid]) -> Vec<String> {
    sessions.iter().map(Uuid::to_string).collect()
}

fn rand_suffix() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}

/// EVAL (not EVALSHA): Redis caches the compiled script, and nothing is lost when a
/// restarted Redis has forgotten it.
fn eval(pipe: &mut Pipeline, script: &str, keys: &[String], args: &[String]) {
    pipe.cmd("EVAL")
        .arg(script)
        .arg(keys.len())
        .arg(keys)
        .arg(args);
}

/// Longest wait for the store, reconnects included (the crate's response timeout does
/// not cover a reconnect in progress). Every script is safe to run again after a
/// timeout that hid its success: counting is idempotent, a take folds what we already
/// hold, settling and giving back act on our own in-flight slot only.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

async fn run<T: redis::FromRedisValue + Default>(
    conn: &Link,
    pipe: &Pipeline,
) -> redis::RedisResult<T> {
    if pipe.is_empty() {
        return Ok(T::default());
    }
    let mut conn = conn.clone();
    within(STORE_TIMEOUT, pipe.query_async(&mut conn)).await
}

/// Runs each pipeline on its own, all at once (on a Cluster, each touches one slot).
async fn run_each<T: redis::FromRedisValue>(
    conn: &Link,
    pipes: &[Pipeline],
) -> redis::RedisResult<Vec<T>> {
    within(STORE_TIMEOUT, conn.each(pipes)).await
}

/// Against a real `redis-server` (started here, on a free loopback port).
#[cfg(test)]
mod tests {
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use redis::IntoConnectionInfo;
    use tokio_util::sync::CancellationToken;

    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A redis-server and a way to open usage stores on it as different instances.
    async fn redis() -> (Server, Redis, TaskTracker) {
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server is installed (scripts/test.sh)");
            let server = Server(child);
            let url = format!("redis://127.0.0.1:{port}");
            let client = redis::Client::open(url.as_str()).unwrap();
            for _ in 0..200 {
                if client.get_multiplexed_async_connection().await.is_ok() {
                    let tasks = TaskTracker::new();
                    let topology = Topology::Single(url.into_connection_info().unwrap());
                    let redis = Redis::start(topology, &tasks, CancellationToken::new());
                    return (server, redis, tasks);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        panic!("redis-server did not start");
    }

    fn store(redis: &Redis, tasks: &TaskTracker, owner: &str, ttl: Duration) -> UsageStore {
        UsageStore::redis(redis, tasks, owner.into(), ttl).unwrap()
    }

    #[tokio::test]
    async fn a_new_instances_report_is_not_taken_for_a_dead_ones() {
        let (_server, redis, tasks) = redis().await;
        let session = Uuid::new_v4();
        let old = store(&redis, &tasks, "old", Duration::from_secs(60));
        old.account(&[], WINDOW).await.unwrap();
        // `old` reads the dead before `new` starts, and takes after `new` took.
        let dead = old.dead_owners().await.unwrap();
        let new = store(&redis, &tasks, "new", Duration::from_secs(60));
        new.account(&[(session, vec![1])], WINDOW).await.unwrap();
        assert_eq!(new.take(&[session]).await.unwrap(), [1]);
        assert_eq!(
            old.take_given(&[session], &dead).await.unwrap(),
            [0],
            "new's report in flight is new's alone"
        );
        new.settle(&[session]).await.unwrap();
        assert_eq!(old.take(&[session]).await.unwrap(), [0]);
    }

    #[tokio::test]
    async fn what_a_dead_instance_left_in_flight_is_taken_once_its_deadline_passed() {
        let (_server, redis, tasks) = redis().await;
        let session = Uuid::new_v4();
        let gone = store(&redis, &tasks, "gone", Duration::from_millis(300));
        gone.account(&[(session, vec![1, 2])], WINDOW)
            .await
            .unwrap();
        assert_eq!(gone.take(&[session]).await.unwrap(), [2]);
        let other = store(&redis, &tasks, "other", Duration::from_secs(60));
        other.account(&[], WINDOW).await.unwrap();
        assert_eq!(other.take(&[session]).await.unwrap(), [0], "gone is alive");
        // `gone` notes its liveness no more: once its deadline passed, its count is
        // given back, whole, once.
        let deadline = Instant::now() + Duration::from_secs(30);
        let taken = loop {
            let taken = other.take(&[session]).await.unwrap()[0];
            if taken > 0 || Instant::now() > deadline {
                break taken;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(taken, 2);
        other.settle(&[session]).await.unwrap();
        assert_eq!(other.take(&[session]).await.unwrap(), [0]);
    }
}
