//! Wiring: builds every part from the configuration, binds the listener, and runs until
//! told to stop, then drains within a bounded time. Tests and `main` use the same entry
//! point, so what the tests start is what production runs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::billing::Billing;
use crate::broker::{Broker, Sink};
use crate::config::Config;
use crate::fanout::Ticker;
use crate::history::History;
use crate::http::{self, AppState};
use crate::lag;
use crate::metrics::Metrics;
use crate::net::StreamListener;
use crate::registry::{Limits, Registry};
use crate::server::{self, Pending};
use crate::session::Sessions;
use crate::topology::Redis;

/// Listen backlog: large, so that thousands of viewers reconnecting at once after a
/// restart are queued rather than refused (the kernel caps it at `somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

pub struct Application {
    listener: TcpListener,
    state: AppState,
    ticker: Ticker,
    billing: Arc<Billing>,
    history: Arc<History>,
    tasks: TaskTracker,
    /// Stops the background tasks (broker, ticker) once HTTP has drained.
    background: CancellationToken,
}

impl Application {
    /// Builds the server and binds its port (`PORT=0` picks a free one).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        metrics.gzip.compressors.set_bytes(config.gzip_memory);
        let tasks = TaskTracker::new();
        let background = CancellationToken::new();
        let sessions = Arc::new(Sessions::new(
            config.max_message_bytes,
            config.inbox_bytes,
            metrics.clone(),
        ));
        let redis = config
            .redis
            .clone()
            .map(|topology| Redis::start(topology, &tasks, background.clone()));
        let history = Arc::new(
            History::new(
                &config,
                redis.as_ref(),
                &tasks,
                sessions.clone(),
                metrics.clone(),
            )
            .context("cannot set up the shared history")?,
        );
        let sink: Sink = {
            let (sessions, history) = (sessions.clone(), history.clone());
            Arc::new(move |event| {
                history.on_broker_event(&event);
                sessions.on_broker_event(event);
            })
        };
        let broker = match &redis {
            None => Broker::memory(sink),
            Some(redis) => Broker::redis(
                redis,
                sink,
                history.is_standby(),
                &tasks,
                background.clone(),
            )
            .context("cannot set up the Redis connection")?,
        };
        let registry = Arc::new(Registry::new(
            sessions,
            broker.clone(),
            history.clone(),
            Limits::from(config.as_ref()),
            metrics.clone(),
        ));
        let owner = format!("{}-{:016x}", config.instance_id, registry.boot);
        let billing = Arc::new(
            Billing::new(&config, redis.as_ref(), &tasks, owner, metrics.clone())
                .context("cannot set up billing")?,
        );
        let ticker = Ticker {
            registry: registry.clone(),
            tick: config.tick,
            heartbeat: config.heartbeat,
            usage: billing.clone(),
            history: history.clone(),
        };
        raise_file_limit(&config);
        let listener = bind(SocketAddr::new(config.bind, config.port))
            .with_context(|| format!("cannot listen on {}:{} (PORT)", config.bind, config.port))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            broker = broker.kind(),
            tick_ms = config.tick.as_millis() as u64,
            instance = %config.instance_id,
            "chat-sync listening"
        );
        Ok(Self {
            listener,
            state: AppState {
                registry,
                broker,
                pending: Pending::new(
                    config.max_pending_connections,
                    metrics.pending_connections.clone(),
                    metrics.pending_evicted.clone(),
                ),
                metrics,
                config,
            },
            ticker,
            billing,
            history,
            tasks,
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then: refuses new connects, sends every
    /// subscriber a `shutdown` event, waits for the streams to close (at most
    /// `SHUTDOWN_TIMEOUT_MS`), stops the background tasks and flushes usage.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            ticker,
            billing,
            history,
            tasks,
            background,
        } = self;
        let registry = state.registry.clone();
        let broker = state.broker.clone();
        let timeout = state.config.shutdown_timeout;
        let handover = state.config.shutdown_handover;
        tasks.spawn(ticker.run(background.clone()));
        tasks.spawn(lag::probe(state.metrics.clone(), background.clone()));
        tasks.spawn(billing.clone().run(background.clone()));
        tasks.spawn(history.clone().run(state.config.tick, background.clone()));

        let header_timeout = state.config.header_timeout;
        let pending = state.pending.clone();
        let listener = StreamListener::new(
            listener,
            state.config.slow_client_timeout,
            state.metrics.slow_subscribers.clone(),
            state.metrics.accept_errors.clone(),
        );
        let (drain, abort) = (CancellationToken::new(), CancellationToken::new());
        let connections = TaskTracker::new();
        let server = tokio::spawn(server::serve(
            listener,
            http::router(state),
            drain.clone(),
            abort.clone(),
            connections.clone(),
            header_timeout,
            pending,
        ));

        shutdown.await;
        tracing::info!(connections = registry.connection_count(), "shutting down");
        let watched = registry.shutdown();
        history.stopping();
        drain.cancel();
        server.await.context("the accept loop panicked")?;
        connections.close();
        if tokio::time::timeout(timeout, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "connections still open after the drain time; closing them"
            );
            abort.cancel();
            connections.wait().await;
        }
        // Viewers reconnect elsewhere; stay subscribed until their sessions are served
        // there, so that they resume exactly.
        history.handover(&broker, watched, handover).await;
        background.cancel();
        tasks.close();
        if tokio::time::timeout(timeout, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop in time");
        }
        // After the ticker's last capture, so the final counts are in.
        if tokio::time::timeout(timeout, billing.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("usage flush did not finish in time");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Descriptors kept beyond the connection limits: Redis, the tenant, logs, the reserve.
const FD_RESERVE: usize = 64;

/// Each viewer and each pending connection is a file descriptor: raises the soft limit
/// as far as the hard one allows, and says so if the limits cannot all be met.
fn raise_file_limit(config: &Config) {
    let wanted = (config.max_connections + config.max_pending_connections + FD_RESERVE) as u64;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the file descriptor limit is below MAX_CONNECTIONS + MAX_PENDING_CONNECTIONS \
             + {FD_RESERVE}: raise it (LimitNOFILE, ulimit -n) or lower those"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the file descriptor limit"),
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
