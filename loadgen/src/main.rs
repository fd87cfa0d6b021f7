//! `loadgen`: opens N SSE connections over S sessions at a controlled rate, publishes R
//! messages per second carrying their publish time, and reports delivery (loss,
//! duplicates, reorders), latency percentiles, and the CPU and memory that both the
//! server (by PID, from /proc) and the load generator itself spent.
//!
//! Single-threaded on purpose: it uses one core and leaves the other to the server,
//! and needs no locks on its counters. Several processes can share a run (`--shard`)
//! to get past the per-process file limit.

mod client;
mod proc_stats;
mod publish;
mod stats;

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// chat-sync: batches of JSON strings; publish to Redis.
    ChatSync,
    /// nginx + Nchan: one event per message; publish over HTTP to Nchan's publisher.
    Nchan,
}

#[derive(Parser, Debug, Clone)]
#[command(about, args_override_self = true)]
pub struct Args {
    #[arg(long, value_enum, default_value = "chat-sync")]
    pub target: Target,
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub server: SocketAddr,
    /// SSE connections to open.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Sessions the connections are spread over (round robin).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Connections opened per second.
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u64,
    /// Messages per second, in total over all sessions (0: idle).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds of measured publishing (after everyone connected).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Padding bytes added to each message.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Redis to publish to (chat-sync).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// A Redis Cluster to publish to instead (`host:port,...`), with `PUBLISH`.
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// With `--redis-cluster`: `SPUBLISH` (sharded pub/sub).
    #[arg(long)]
    pub sharded: bool,
    /// Nchan publisher address (its `/pub?id=` location).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub nchan_pub: SocketAddr,
    /// Source addresses to spread connections over (127.0.0.x), for the port range.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub source: Vec<IpAddr>,
    /// Server PIDs whose CPU and RSS to report (nginx: master and workers).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Session ids are derived from this, so that shards of one run agree.
    #[arg(long, default_value_t = 1)]
    pub run: u64,
    /// `i/n`: this process opens connections i, i+n, i+2n... and only shard 0 publishes.
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Free text copied into the report (scenario, run number...).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Seconds to wait for stragglers after publishing stops.
    #[arg(long, default_value_t = 2)]
    pub drain: u64,
    /// Query string for chat-sync's stream URL (e.g. `interval_ms=250`: a delivery
    /// class).
    #[arg(long, default_value = "")]
    pub query: String,
    /// Ask for gzip streams (`Accept-Encoding: gzip`, as browsers do) and decode them.
    #[arg(long)]
    pub gzip: bool,
    /// Publish chat messages as a real chat has them (nickname, profile URL, Korean and
    /// English text, ids, timestamps) instead of padding, which would flatter any
    /// compressor.
    #[arg(long)]
    pub realistic: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.server.ip().is_loopback() && args.source.iter().all(IpAddr::is_loopback),
        "loadgen only targets loopback addresses"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&runtime, run(args))?;
    println!("{report}");
    Ok(())
}

/// A session's id on the wire: a UUID derived from the run and the session index.
pub fn session_id(run: u64, index: usize) -> String {
    format!("00000000-0000-4000-8000-{:04x}{:08x}", run & 0xffff, index)
}

async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    let (shard, shards) = args
        .shard
        .split_once('/')
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|(a, b)| a < b)
        .ok_or_else(|| anyhow::anyhow!("--shard must be i/n"))?;
    let stats = Rc::new(RefCell::new(stats::Stats::new(args.sessions)));
    let rss_base = proc_stats::rss_kib(&args.server_pid);

    // Connect at the requested rate.
    let started = Instant::now();
    let mine: Vec<usize> = (shard..args.connections).step_by(shards).collect();
    let gap = Duration::from_secs_f64(shards as f64 / args.connect_rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    for (n, &i) in mine.iter().enumerate() {
        let source = args.source[n % args.source.len()];
        tokio::task::spawn_local(client::run(
            args.clone(),
            i % args.sessions,
            source,
            stats.clone(),
        ));
        next += gap;
        tokio::time::sleep_until(next).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.borrow().connected + stats.borrow().failed < mine.len() && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = proc_stats::rss_kib(&args.server_pid);

    // Publish and measure.
    stats.borrow_mut().reset_window();
    let cpu_window = proc_stats::Cpu::now(&args.server_pid);
    let own_window = proc_stats::Cpu::own();
    let window = Instant::now();
    let published = if shard == 0 && args.rate > 0 {
        publish::run(&args, stats.clone()).await?
    } else {
        tokio::time::sleep(Duration::from_secs(args.duration)).await;
        0
    };
    tokio::time::sleep(Duration::from_secs(args.drain)).await;
    let elapsed = window.elapsed().as_secs_f64();
    let server_cpu = cpu_window.elapsed(&args.server_pid);
    let own_cpu = proc_stats::Cpu::own_since(own_window);
    let rss_end = proc_stats::rss_kib(&args.server_pid);
    let s = stats.borrow();
    Ok(s.report(stats::Context {
        args: &args,
        connections: mine.len(),
        connect_secs,
        published,
        elapsed,
        server_cpu,
        own_cpu,
        rss_base,
        rss_connected,
        rss_end,
    }))
}
