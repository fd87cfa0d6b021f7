//! Where usage is counted before it is reported: shared by every instance (in Redis),
//! so that each message is billed once however many instances received it, and
//! usage that one instance counted is billed even if that instance dies.
//!
//! Per session (keys share the session's hash tag, so one slot holds them):
//! - `seen`: the fingerprints counted in the last window (a sorted set by time);
//!   counting a fingerprint that is already there adds nothing.
//! - `usage`: a hash with `pending` (counted, not yet reported) and one
//!   `inflight:<owner>` per instance with a report in flight.
//!
//! Reporting takes `pending` into the taker's `inflight` field; the tenant's answer
//! either settles it (dropped) or gives it back to `pending`. An instance whose
//! liveness key has expired (it died mid-report) has its in-flight count given back by
//! the next taker. Sessions with anything unsettled are listed in one set, so that any
//! instance can settle usage left by an instance that is gone.
//!
//! Without Redis (one instance), the same operations run on a map in memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{ConnectionInfo, Pipeline};
use uuid::Uuid;

/// Counts the fingerprints not seen in the window; returns how many were new.
/// KEYS: seen, usage, unsettled. ARGV: window ms, session, fingerprints...
const ACCOUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local added = 0
for i = 3, #ARGV do
  added = added + redis.call('ZADD', KEYS[1], 'NX', now, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], window)
if added > 0 then
  redis.call('HINCRBY', KEYS[2], 'pending', added)
  redis.call('SADD', KEYS[3], ARGV[2])
end
return added";

/// Gives dead owners' in-flight counts back, then moves `pending` (and any count of
/// ours still in flight) into our in-flight field; returns it. Forgets a settled
/// session. KEYS: usage, unsettled. ARGV: owner, session, liveness key prefix.
const TAKE: &str = r"
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local owner = string.match(fields[i], '^inflight:(.*)$')
  if owner and owner ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. owner) == 0 then
    redis.call('HINCRBY', KEYS[1], 'pending', fields[i + 1])
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
local mine = 'inflight:' .. ARGV[1]
local n = tonumber(redis.call('HGET', KEYS[1], 'pending') or '0')
  + tonumber(redis.call('HGET', KEYS[1], mine) or '0')
if n > 0 then
  redis.call('HSET', KEYS[1], 'pending', 0, mine, n)
elseif redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return n";

/// Our report was answered for good: drop our in-flight count. ARGV as for TAKE.
const SETTLE: &str = r"
redis.call('HDEL', KEYS[1], 'inflight:' .. ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'pending') or '0') == 0
    and redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1";

/// Our report failed: give our in-flight count back to `pending`.
const GIVE_BACK: &str = r"
local mine = 'inflight:' .. ARGV[1]
local n = tonumber(redis.call('HGET', KEYS[1], mine) or '0')
redis.call('HDEL', KEYS[1], mine)
if n > 0 then redis.call('HINCRBY', KEYS[1], 'pending', n) end
return n";

/// Sessions with unsettled usage looked at per round, besides this instance's own.
const SWEEP: usize = 32;
const UNSETTLED_KEY: &str = "chat-sync:billing:unsettled";
/// Set by the first instance to use a Redis; gone after a Redis restart that lost the
/// store (no persistence), which instances notice and report.
const EPOCH_KEY: &str = "chat-sync:billing:epoch";
const ALIVE_PREFIX: &str = "chat-sync:billing:alive:";

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
        conn: ConnectionManager,
        /// Unique per process, so a restarted instance never mistakes an old
        /// in-flight count for its own.
        owner: String,
        /// How long this instance's liveness key lives without being refreshed.
        alive_ttl: Duration,
        /// The store's epoch as last seen; a different one means it lost its state.
        epoch: Mutex<Option<String>>,
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
        info: ConnectionInfo,
        owner: String,
        alive_ttl: Duration,
    ) -> redis::RedisResult<Self> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(usize::MAX)
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_lazy_with_config(redis::Client::open(info)?, config)?;
        Ok(Self::Redis {
            conn,
            owner,
            alive_ttl,
            epoch: Mutex::new(None),
        })
    }

    /// Refreshes this instance's liveness and counts `batches` of fingerprints;
    /// returns how many of each batch were new (not counted by anyone before).
    pub async fn account(
        &self,
        batches: &[(Uuid, Vec<u64>)],
        window: Duration,
    ) -> redis::RedisResult<Accounted> {
        let (conn, owner, alive_ttl, epoch) = match self {
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
            } => (conn, owner, alive_ttl, epoch),
        };
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(EPOCH_KEY)
            .arg(format!("{owner}-{:x}", rand_suffix()))
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(EPOCH_KEY);
        pipe.cmd("SET")
            .arg(format!("{ALIVE_PREFIX}{owner}"))
            .arg(1)
            .arg("PX")
            .arg(alive_ttl.as_millis() as u64)
            .ignore();
        for (session, fps) in batches {
            let mut args = vec![window.as_millis().to_string(), session.to_string()];
            args.extend(fps.iter().map(|fp| format!("{fp:016x}")));
            eval(
                &mut pipe,
                ACCOUNT,
                &[
                    seen_key(*session),
                    usage_key(*session),
                    UNSETTLED_KEY.into(),
                ],
                &args,
            );
        }
        let (current, added): (String, Vec<u64>) = {
            let mut values: Vec<redis::Value> = run(conn, &pipe).await?;
            let current = redis::from_redis_value(values.remove(0))?;
            (
                current,
                redis::from_redis_value(redis::Value::Array(values))?,
            )
        };
        let previous = epoch.lock().unwrap().replace(current.clone());
        Ok(Accounted {
            added,
            store_reset: previous.is_some_and(|p| p != current),
        })
    }

    /// Takes what is pending for each of `sessions` for this instance to report.
    pub async fn take(&self, sessions: &[Uuid]) -> redis::RedisResult<Vec<u64>> {
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
            Self::Redis { conn, owner, .. } => {
                let mut pipe = redis::pipe();
                for &s in sessions {
                    self.per_session(&mut pipe, TAKE, s, owner);
                }
                run(conn, &pipe).await
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
            Self::Redis { conn, owner, .. } => {
                let mut pipe = redis::pipe();
                for &s in sessions {
                    self.per_session(&mut pipe, script, s, owner);
                }
                run::<Vec<i64>>(conn, &pipe).await.map(drop)
            }
        }
    }

    fn per_session(&self, pipe: &mut Pipeline, script: &str, session: Uuid, owner: &str) {
        eval(
            pipe,
            script,
            &[usage_key(session), UNSETTLED_KEY.into()],
            &[owner.into(), session.to_string(), ALIVE_PREFIX.into()],
        );
    }
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
    conn: &ConnectionManager,
    pipe: &Pipeline,
) -> redis::RedisResult<T> {
    if pipe.is_empty() {
        return Ok(T::default());
    }
    let mut conn = conn.clone();
    match tokio::time::timeout(STORE_TIMEOUT, pipe.query_async(&mut conn)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the usage store did not answer",
        )
        .into()),
    }
}
