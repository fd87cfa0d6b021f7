//! Following the master that the sentinels name. One task asks them every
//! [`ASK_EVERY`]; each link rebuilds its connection manager on the new master when the
//! answer changes, restores its subscriptions there, and tells its push handler that
//! the old connection is gone (a gap: what was published in between is lost to it).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ConnectionInfo, PushInfo, PushKind, RedisConnectionInfo, RedisResult};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Kind, LinkOptions, SentinelSettings};

/// How often the sentinels are asked for the master: bounds how long a link stays on
/// a master that has been replaced.
const ASK_EVERY: Duration = Duration::from_millis(500);

/// Asks the sentinels for the master until `token` is cancelled, and publishes each
/// new answer.
pub(super) async fn watch_master(
    settings: SentinelSettings,
    master: watch::Sender<Option<ConnectionInfo>>,
    token: CancellationToken,
) {
    let mut client = match SentinelClient::build(
        settings.sentinels.clone(),
        settings.master.clone(),
        Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(settings.node)),
        SentinelServerType::Master,
    ) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot use REDIS_SENTINELS");
            return;
        }
    };
    let mut failing = false;
    loop {
        match tokio::time::timeout(ASK_EVERY * 4, client.async_get_client()).await {
            Ok(Ok(found)) => {
                failing = false;
                let info = found.get_connection_info().clone();
                let changed = master
                    .borrow()
                    .as_ref()
                    .is_none_or(|m| m.addr() != info.addr());
                if changed {
                    tracing::info!(master = %info.addr(), name = %settings.master, "the sentinels name a master");
                    master.send_replace(Some(info));
                }
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(error = %e, name = %settings.master, "the sentinels name no master");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!(name = %settings.master, "the sentinels do not answer");
            }
            _ => {}
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(ASK_EVERY) => {}
        }
    }
}

/// A link that follows the master.
pub struct Follower {
    state: Mutex<State>,
    /// Pushes of managers other than the current one are dropped: an old master that
    /// is still up (demoted to a replica, it still receives what is published) must
    /// not deliver a second copy.
    generation: Arc<AtomicU64>,
    options: LinkOptions,
    node: RedisConnectionInfo,
}

#[derive(Default)]
struct State {
    manager: Option<ConnectionManager>,
    channels: BTreeSet<String>,
    patterns: BTreeSet<String>,
}

impl Follower {
    pub(super) fn start(
        node: RedisConnectionInfo,
        mut master: watch::Receiver<Option<ConnectionInfo>>,
        options: LinkOptions,
        tasks: &TaskTracker,
    ) -> Arc<Self> {
        let follower = Arc::new(Self {
            state: Mutex::new(State::default()),
            generation: Arc::new(AtomicU64::new(0)),
            options,
            node,
        });
        let weak = Arc::downgrade(&follower);
        master.mark_changed();
        tasks.spawn(async move {
            while master.changed().await.is_ok() {
                let Some(info) = master.borrow_and_update().clone() else {
                    continue;
                };
                let Some(follower) = weak.upgrade() else {
                    return;
                };
                follower.move_to(info).await;
            }
        });
        follower
    }

    /// The current master's manager.
    pub(super) fn current(&self) -> RedisResult<ConnectionManager> {
        self.state.lock().unwrap().manager.clone().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the sentinels have not named a master yet",
            )
            .into()
        })
    }

    async fn move_to(&self, info: ConnectionInfo) {
        let info = info.set_redis_settings(self.node.clone());
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut options = self.options.clone();
        if let Some(push) = self.options.push.clone() {
            let current = self.generation.clone();
            options.push = Some(Arc::new(move |info: PushInfo| {
                if current.load(Ordering::Acquire) == generation {
                    push(info);
                }
            }));
        }
        let manager = match redis::Client::open(super::with_protocol(info, &options))
            .and_then(|client| super::manager(client, &options))
        {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot connect to the master the sentinels name");
                return;
            }
        };
        let (had, channels, patterns) = {
            let mut state = self.state.lock().unwrap();
            let had = state.manager.replace(manager.clone()).is_some();
            (
                had,
                state.channels.iter().cloned().collect::<Vec<_>>(),
                state.patterns.iter().cloned().collect::<Vec<_>>(),
            )
        };
        if let Some(push) = &self.options.push {
            if had {
                push(PushInfo {
                    kind: PushKind::Disconnection,
                    data: vec![],
                });
            }
            let mut manager = manager;
            for (kind, list) in [(Kind::Channel, channels), (Kind::Pattern, patterns)] {
                if list.is_empty() {
                    continue;
                }
                if let Err(e) = super::subscribe(&mut manager, kind, &list).await {
                    tracing::warn!(error = %e, "cannot restore the subscriptions on the new master; the manager retries");
                }
            }
        }
    }

    /// Subscribes on the current master and remembers it for the next one. Noted
    /// before the manager is read, under one lock: a move in between restores it.
    pub(super) async fn subscribe(&self, kind: Kind, channels: &[String]) -> RedisResult<()> {
        let manager = {
            let mut state = self.state.lock().unwrap();
            let set = state.set(kind);
            set.extend(channels.iter().cloned());
            state.manager.clone()
        };
        super::subscribe(&mut manager.ok_or_else(no_master)?, kind, channels).await
    }

    pub(super) async fn unsubscribe(&self, kind: Kind, channels: &[String]) -> RedisResult<()> {
        let manager = {
            let mut state = self.state.lock().unwrap();
            let set = state.set(kind);
            for c in channels {
                set.remove(c);
            }
            state.manager.clone()
        };
        super::unsubscribe(&mut manager.ok_or_else(no_master)?, kind, channels).await
    }
}

impl State {
    fn set(&mut self, kind: Kind) -> &mut BTreeSet<String> {
        match kind {
            Kind::Pattern => &mut self.patterns,
            _ => &mut self.channels,
        }
    }
}

fn no_master() -> redis::RedisError {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the sentinels have not named a master yet",
    )
    .into()
}
