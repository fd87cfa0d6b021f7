//! Who bills a session when several instances serve it: a short per-session lease in
//! Redis, renewed by its holder at every flush, and the holder's billing cursor beside
//! it. Without Redis there is one instance, which always holds every lease.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{ConnectionInfo, Pipeline};
use uuid::Uuid;

/// Takes the lease if free, renews it if ours; 1 if we hold it afterwards.
const ACQUIRE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0";

/// Moves the cursor only while we still hold the lease.
const SET_CURSOR: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) return 1
end
return 0";

/// Lets the lease go at once (instead of at expiry) when we stop serving the session.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Cursors outlive any plausible handover, and then expire with the session.
const CURSOR_TTL: Duration = Duration::from_secs(3600);

pub enum Lease {
    /// Single instance (in-process broker): every session is ours.
    Solo,
    Redis {
        conn: ConnectionManager,
        /// Unique per process, so a restarted instance never mistakes an old lease
        /// for its own.
        owner: String,
        ttl: Duration,
    },
}

fn lease_key(session: Uuid) -> String {
    format!("chat-sync:billing:lease:{session}")
}

fn cursor_key(session: Uuid) -> String {
    format!("chat-sync:billing:cursor:{session}")
}

impl Lease {
    pub fn redis(info: ConnectionInfo, owner: String, ttl: Duration) -> redis::RedisResult<Self> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(usize::MAX)
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_lazy_with_config(redis::Client::open(info)?, config)?;
        Ok(Self::Redis { conn, owner, ttl })
    }

    /// Which of `sessions` this instance holds after trying to acquire or renew each.
    pub async fn acquire(&self, sessions: &[Uuid]) -> redis::RedisResult<Vec<bool>> {
        let Self::Redis { conn, owner, ttl } = self else {
            return Ok(vec![true; sessions.len()]);
        };
        let mut pipe = redis::pipe();
        for &s in sessions {
            eval(
                &mut pipe,
                ACQUIRE,
                &[lease_key(s)],
                &[owner.clone(), millis(*ttl)],
            );
        }
        let held: Vec<i64> = run(conn, &pipe).await?;
        Ok(held.into_iter().map(|v| v == 1).collect())
    }

    /// The billing cursors left by previous holders.
    pub async fn cursors(&self, sessions: &[Uuid]) -> redis::RedisResult<Vec<Option<u64>>> {
        let Self::Redis { conn, .. } = self else {
            return Ok(vec![None; sessions.len()]);
        };
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = sessions.iter().map(|s| cursor_key(*s)).collect();
        let mut pipe = redis::pipe();
        pipe.cmd("MGET").arg(keys);
        let (values,): (Vec<Option<u64>>,) = run(conn, &pipe).await?;
        Ok(values)
    }

    /// Records where billing stands, for a later holder.
    pub async fn set_cursors(&self, cursors: &[(Uuid, u64)]) -> redis::RedisResult<()> {
        let Self::Redis { conn, owner, .. } = self else {
            return Ok(());
        };
        let mut pipe = redis::pipe();
        for &(s, cursor) in cursors {
            let args = [owner.clone(), cursor.to_string(), millis(CURSOR_TTL)];
            eval(&mut pipe, SET_CURSOR, &[lease_key(s), cursor_key(s)], &args);
        }
        run::<Vec<i64>>(conn, &pipe).await.map(drop)
    }

    pub async fn release(&self, sessions: &[Uuid]) -> redis::RedisResult<()> {
        let Self::Redis { conn, owner, .. } = self else {
            return Ok(());
        };
        let mut pipe = redis::pipe();
        for &s in sessions {
            eval(
                &mut pipe,
                RELEASE,
                &[lease_key(s)],
                std::slice::from_ref(owner),
            );
        }
        run::<Vec<i64>>(conn, &pipe).await.map(drop)
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
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

async fn run<T: redis::FromRedisValue + Default>(
    conn: &ConnectionManager,
    pipe: &Pipeline,
) -> redis::RedisResult<T> {
    if pipe.is_empty() {
        return Ok(T::default());
    }
    let mut conn = conn.clone();
    pipe.query_async(&mut conn).await
}
