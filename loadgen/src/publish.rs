//! The publisher: exactly `rate × duration` messages, round robin over the sessions,
//! paced every millisecond, each carrying its session, sequence number and publish
//! time. To Redis for chat-sync (as a tenant backend does), to Nchan's HTTP publisher
//! for Nchan (pipelined on one keep-alive connection).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::now_us;
use crate::stats::Stats;
use crate::{Args, Target, session_id};

pub async fn run(args: &Args, _stats: Rc<RefCell<Stats>>) -> anyhow::Result<u64> {
    let total = args.rate * args.duration;
    let padding = "x".repeat(args.payload_bytes);
    let mut next_q = vec![0u64; args.sessions];
    let mut sink = Sink::open(args).await?;
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * args.rate as f64) as u64).min(total);
        let mut batch = Vec::with_capacity((due - sent) as usize);
        while sent < due {
            let s = (sent % args.sessions as u64) as usize;
            let q = next_q[s];
            next_q[s] += 1;
            let payload = if args.realistic {
                realistic(s, q)
            } else {
                format!(r#"{{"s":{s},"q":{q},"t":{},"p":"{padding}"}}"#, now_us())
            };
            batch.push((session_id(args.run, s), payload));
            sent += 1;
        }
        if !batch.is_empty() {
            sink.send(batch).await?;
        }
    }
    sink.finish().await?;
    Ok(sent)
}

/// A chat message shaped as real ones are (~280 bytes); `s`, `q` and `t` first, as the
/// viewers' scanner expects, and no other key ending in `q` or `t`.
fn realistic(s: usize, q: u64) -> String {
    const TEXTS: [&str; 8] = [
        "안녕하세요! 오늘 방송 너무 재밌어요 ㅋㅋㅋ",
        "what a play, did you see that??",
        "첫 방송부터 보고 있어요, 항상 응원합니다",
        "lol the chat is so fast today",
        "이거 진짜 대박이다 👏👏",
        "can you say hi to my friend minji",
        "오늘 몇 시까지 방송하세요?",
        "GG, that was close",
    ];
    // A cheap, deterministic spread of viewers and texts.
    let x = (q.wrapping_mul(2_654_435_761) ^ s as u64).wrapping_mul(40_503);
    let viewer = x % 997;
    let micros = now_us();
    format!(
        r#"{{"s":{s},"q":{q},"t":{micros},"id":"{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}","nickname":"viewer_{viewer}","profileImgUrl":"https://cdn.example.com/profiles/{viewer}/avatar_{:x}.png","message":"{}","createdAt":"2026-11-27T10:{:02}:{:02}.{:03}"}}"#,
        x as u32,
        (x >> 32) as u16,
        x % 4096,
        (x >> 12) % 4096,
        micros % (1 << 48),
        x % 65_536,
        TEXTS[(x >> 20) as usize % TEXTS.len()],
        micros / 60_000_000 % 60,
        micros / 1_000_000 % 60,
        micros / 1000 % 1000,
    )
}

enum Sink {
    Redis(redis::aio::MultiplexedConnection),
    /// One request per message, all in flight at once: on a Cluster a pipeline may
    /// only address one slot.
    Cluster {
        conn: redis::cluster_async::ClusterConnection,
        sharded: bool,
    },
    Nchan {
        conn: TcpStream,
        outstanding: usize,
        seen: Vec<u8>,
    },
}

impl Sink {
    async fn open(args: &Args) -> anyhow::Result<Self> {
        Ok(match args.target {
            Target::ChatSync if !args.redis_cluster.is_empty() => Self::Cluster {
                conn: redis::cluster::ClusterClient::new(
                    args.redis_cluster
                        .iter()
                        .map(|n| format!("redis://{n}"))
                        .collect::<Vec<_>>(),
                )?
                .get_async_connection()
                .await?,
                sharded: args.sharded,
            },
            Target::ChatSync => Self::Redis(
                redis::Client::open(args.redis.as_str())?
                    .get_multiplexed_async_connection()
                    .await?,
            ),
            Target::Nchan => {
                let conn = TcpStream::connect(args.nchan_pub).await?;
                conn.set_nodelay(true)?;
                Self::Nchan {
                    conn,
                    outstanding: 0,
                    seen: Vec::new(),
                }
            }
        })
    }

    async fn send(&mut self, batch: Vec<(String, String)>) -> anyhow::Result<()> {
        match self {
            Self::Redis(conn) => {
                let mut pipe = redis::pipe();
                for (channel, payload) in &batch {
                    pipe.publish(channel, payload).ignore();
                }
                pipe.query_async::<()>(conn).await?;
            }
            Self::Cluster { conn, sharded } => {
                let command = if *sharded { "SPUBLISH" } else { "PUBLISH" };
                futures::future::try_join_all(batch.iter().map(|(channel, payload)| {
                    let mut conn = conn.clone();
                    let mut cmd = redis::cmd(command);
                    cmd.arg(channel).arg(payload);
                    async move { cmd.query_async::<()>(&mut conn).await }
                }))
                .await?;
            }
            Self::Nchan {
                conn,
                outstanding,
                seen,
            } => {
                let mut out = String::new();
                for (channel, payload) in &batch {
                    out.push_str(&format!(
                        "POST /pub?id={channel} HTTP/1.1\r\nHost: loadgen\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
                        payload.len()
                    ));
                }
                conn.write_all(out.as_bytes()).await?;
                *outstanding += batch.len();
                drain_responses(conn, outstanding, seen, false).await?;
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        if let Self::Nchan {
            conn,
            outstanding,
            seen,
        } = self
        {
            drain_responses(conn, outstanding, seen, true).await?;
        }
        Ok(())
    }
}

/// Counts Nchan's responses (each starts with a status line) without parsing bodies;
/// `wait` blocks until every request has been answered.
async fn drain_responses(
    conn: &mut TcpStream,
    outstanding: &mut usize,
    seen: &mut Vec<u8>,
    wait: bool,
) -> anyhow::Result<()> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = if wait && *outstanding > 0 {
            conn.read(&mut buf).await?
        } else {
            match conn.try_read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        };
        anyhow::ensure!(
            n > 0 || *outstanding == 0,
            "nchan closed the publisher connection"
        );
        seen.extend_from_slice(&buf[..n]);
        let mut last = 0;
        while let Some(p) = seen[last..].windows(9).position(|w| w == b"HTTP/1.1 ") {
            let status = &seen[last + p + 9..];
            if !status.is_empty() {
                anyhow::ensure!(status[0] == b'2', "nchan refused a publish");
            }
            *outstanding = outstanding.saturating_sub(1);
            last += p + 9;
        }
        seen.drain(..last);
        if *outstanding == 0 || (!wait && n == 0) {
            return Ok(());
        }
    }
}
