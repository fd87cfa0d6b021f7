//! The shared history in Redis: per session (keys share the session's hash tag, so one
//! slot holds them) a list of recent entries, an index fingerprint → place, and a hash
//! of metadata (`total` entries ever appended, `base` entries trimmed, `bytes`, `tail`,
//! and one `ask:<id>` per answered join request). An entry is the fingerprint in 16 hex
//! digits followed by the payload, or `-` for a gap. Places count from 1 and never
//! change: entry `i` of the list is place `base + i + 1`.

use std::time::Duration;

use bytes::Bytes;
use redis::Pipeline;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::topology::{Link, LinkOptions, Redis, within};

/// Appends a writer's run of items where it continues the history (see the module
/// docs of `history`). KEYS: list, index, meta. ARGV: max entries, max bytes, ttl ms,
/// mode (`k` joined after `prev`, `g` after a gap, `u` not joined), prev (hex or ``),
/// then items: `m` fp payload | `g` | `a` ask-id. Returns {mode, prev, answered asks}.
const APPEND: &str = r"
local total = tonumber(redis.call('HGET', KEYS[3], 'total') or '0')
local base = tonumber(redis.call('HGET', KEYS[3], 'base') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
local tail = redis.call('HGET', KEYS[3], 'tail') or ''
local mode, prev = ARGV[4], ARGV[5]
local answered = 0
local function push(entry, name)
  redis.call('RPUSH', KEYS[1], entry)
  total = total + 1
  bytes = bytes + #entry
  if name then redis.call('HSET', KEYS[2], name, total) end
  tail = name or '-'
end
local i = 6
while i <= #ARGV do
  local kind = ARGV[i]
  if kind == 'g' then
    if mode ~= 'u' then mode = 'g' end
    i = i + 1
  elseif kind == 'a' then
    if mode == 'k' then
      local at = 0
      if prev ~= '' then at = tonumber(redis.call('HGET', KEYS[2], prev) or '-1') end
      if at >= 0 and (prev ~= '' or total == base) then
        redis.call('HSETNX', KEYS[3], 'ask:' .. ARGV[i + 1], at)
        answered = answered + 1
      end
    end
    i = i + 2
  else
    local fp, payload = ARGV[i + 1], ARGV[i + 2]
    if redis.call('HEXISTS', KEYS[2], fp) == 1 then
      mode, prev = 'k', fp
    elseif total == base or (mode == 'k' and prev == tail) then
      push(fp .. payload, fp)
      mode, prev = 'k', fp
    elseif mode == 'g' then
      if tail ~= '-' then push('-', nil) end
      push(fp .. payload, fp)
      mode, prev = 'k', fp
    else
      mode = 'u'
    end
    i = i + 3
  end
end
local max_n, max_b = tonumber(ARGV[1]), tonumber(ARGV[2])
while (total - base) > max_n or (bytes > max_b and (total - base) > 1) do
  local old = redis.call('LPOP', KEYS[1])
  if not old then break end
  base = base + 1
  bytes = bytes - #old
  if #old >= 16 then
    local name = string.sub(old, 1, 16)
    if tonumber(redis.call('HGET', KEYS[2], name) or '0') == base then
      redis.call('HDEL', KEYS[2], name)
    end
  end
end
redis.call('HSET', KEYS[3], 'total', total, 'base', base, 'bytes', bytes, 'tail', tail)
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ARGV[3]) end
return {mode, prev, answered}";

/// The whole history and where a join request fell. KEYS: list, meta. ARGV: ask id.
const READ: &str = r"
local meta = redis.call('HMGET', KEYS[2], 'base', 'ask:' .. ARGV[1])
redis.call('HDEL', KEYS[2], 'ask:' .. ARGV[1])
return {meta[1] or '0', meta[2] or '', redis.call('LRANGE', KEYS[1], 0, -1)}";

fn keys(session: Uuid) -> [String; 3] {
    [
        format!("chat-sync:history:{{{session}}}"),
        format!("chat-sync:history:{{{session}}}:index"),
        format!("chat-sync:history:{{{session}}}:meta"),
    ]
}

/// Where a writer stands against the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Its view continues the history after this message (`None`: the history was
    /// empty when it joined).
    Joined(Option<u64>),
    /// Its view has a gap: what comes next is appended after a gap entry.
    Gap,
    /// Its view does not join the history: it writes nothing until it meets a
    /// message the history has.
    Unjoined,
}

/// One thing a writer saw, in order.
#[derive(Clone, Debug)]
pub enum Item {
    Message(u64, Bytes),
    Gap,
    /// A join request arrived here (after the messages before it).
    Ask(u64),
}

/// One entry of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Message(u64, Bytes),
    Gap,
}

/// The history as read by a joining instance.
pub struct Snapshot {
    /// Places trimmed before the first entry.
    pub base: u64,
    /// Where the join request fell, if an instance serving the session answered it.
    pub answer: Option<u64>,
    pub entries: Vec<Entry>,
}

pub struct HistoryStore {
    conn: Link,
    /// `APPEND`, sent by its hash: it is run for every session that received
    /// something, every tick, and its text is longer than most rounds' payloads.
    append: redis::Script,
    max_entries: usize,
    max_bytes: usize,
    ttl: Duration,
}

/// Longest wait for one round, reconnects included.
const TIMEOUT: Duration = Duration::from_secs(5);

impl HistoryStore {
    pub fn new(
        redis: &Redis,
        tasks: &TaskTracker,
        max_entries: usize,
        max_bytes: usize,
        ttl: Duration,
    ) -> redis::RedisResult<Self> {
        let conn = redis.link(
            LinkOptions {
                push: None,
                response_timeout: None,
            },
            tasks,
        )?;
        Ok(Self {
            conn,
            append: redis::Script::new(APPEND),
            max_entries,
            max_bytes,
            ttl,
        })
    }

    /// Appends each session's items from its cursor; returns the cursors after them
    /// and how many join requests each answered.
    pub async fn append(
        &self,
        runs: &[(Uuid, Cursor, Vec<Item>)],
    ) -> redis::RedisResult<Vec<(Cursor, u64)>> {
        let commands: Vec<redis::Cmd> = runs
            .iter()
            .map(|(session, cursor, items)| self.append_command(*session, *cursor, items))
            .collect();
        let replies = match self.send(&commands).await {
            // A restarted (or newly promoted) Redis has forgotten the script.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut conn = self.conn.clone();
                within(TIMEOUT, self.append.prepare_invoke().load_async(&mut conn)).await?;
                self.send(&commands).await?
            }
            replies => replies?,
        };
        Ok(replies
            .into_iter()
            .map(|(mode, prev, answered)| {
                let cursor = match mode.as_str() {
                    "k" if prev.is_empty() => Cursor::Joined(None),
                    "k" => u64::from_str_radix(&prev, 16)
                        .map_or(Cursor::Unjoined, |fp| Cursor::Joined(Some(fp))),
                    "g" => Cursor::Gap,
                    _ => Cursor::Unjoined,
                };
                (cursor, answered)
            })
            .collect())
    }

    fn append_command(&self, session: Uuid, cursor: Cursor, items: &[Item]) -> redis::Cmd {
        let (mode, prev) = match cursor {
            Cursor::Joined(prev) => ("k", prev.map(hex).unwrap_or_default()),
            Cursor::Gap => ("g", String::new()),
            Cursor::Unjoined => ("u", String::new()),
        };
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.append.get_hash())
            .arg(3)
            .arg(&keys(session)[..])
            .arg(self.max_entries)
            .arg(self.max_bytes)
            .arg(self.ttl.as_millis() as u64)
            .arg(mode)
            .arg(prev);
        for item in items {
            match item {
                Item::Message(fp, payload) => cmd.arg("m").arg(hex(*fp)).arg(payload.as_ref()),
                Item::Gap => cmd.arg("g"),
                Item::Ask(id) => cmd.arg("a").arg(hex(*id)),
            };
        }
        cmd
    }

    /// Sends a round's appends: in one pipeline (one write and one read for the whole
    /// round) except on a Cluster, where sessions live in different slots and each
    /// goes on its own.
    async fn send(
        &self,
        commands: &[redis::Cmd],
    ) -> redis::RedisResult<Vec<(String, String, u64)>> {
        if self.conn.is_cluster() {
            let pipes: Vec<Pipeline> = commands
                .iter()
                .map(|cmd| {
                    let mut pipe = redis::pipe();
                    pipe.add_command(cmd.clone());
                    pipe
                })
                .collect();
            let replies: Vec<((String, String, u64),)> =
                within(TIMEOUT, self.conn.each(&pipes)).await?;
            return Ok(replies.into_iter().map(|(reply,)| reply).collect());
        }
        let mut pipe = redis::pipe();
        for cmd in commands {
            pipe.add_command(cmd.clone());
        }
        self.run(&pipe).await
    }

    /// Whether the join request `ask` was answered yet.
    pub async fn answered(&self, session: Uuid, ask: u64) -> redis::RedisResult<bool> {
        let [_, _, meta] = keys(session);
        let mut pipe = redis::pipe();
        pipe.cmd("HEXISTS")
            .arg(&meta)
            .arg(format!("ask:{}", hex(ask)));
        let (answered,): (bool,) = self.run(&pipe).await?;
        Ok(answered)
    }

    /// Whether the history holds the message named `fingerprint`.
    pub async fn knows(&self, session: Uuid, fingerprint: u64) -> redis::RedisResult<bool> {
        let [_, index, _] = keys(session);
        let mut pipe = redis::pipe();
        pipe.cmd("HEXISTS").arg(index).arg(hex(fingerprint));
        let (known,): (bool,) = self.run(&pipe).await?;
        Ok(known)
    }

    /// The whole history, and where `ask` fell if it was answered.
    pub async fn read(&self, session: Uuid, ask: u64) -> redis::RedisResult<Snapshot> {
        let [list, _, meta] = keys(session);
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(READ)
            .arg(2)
            .arg(list)
            .arg(meta)
            .arg(hex(ask));
        let ((base, answer, raw),): ((String, String, Vec<Vec<u8>>),) = self.run(&pipe).await?;
        let entries = raw
            .into_iter()
            .filter_map(|entry| {
                if entry.len() < 16 {
                    return Some(Entry::Gap);
                }
                let fp = std::str::from_utf8(&entry[..16])
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())?;
                Some(Entry::Message(fp, Bytes::from(entry).slice(16..)))
            })
            .collect();
        Ok(Snapshot {
            base: base.parse().unwrap_or(0),
            answer: answer.parse().ok(),
            entries,
        })
    }

    async fn run<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> redis::RedisResult<T> {
        let mut conn = self.conn.clone();
        within(TIMEOUT, pipe.query_async(&mut conn)).await
    }
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}
