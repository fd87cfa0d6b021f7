//! Applying (un)subscribes in the order they were asked for, and the subscription to
//! chat-sync's own join channel, on the broker's Redis link.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::redis::{HEALTH_INTERVAL, with_timeout};
use super::{
    BrokerError, JOIN_CHANNEL, SESSION_PATTERN, STANDBY_CHANNEL, SUBSCRIBING, chat_channel,
    end_channel, sharded_join_channel,
};
use crate::topology::{Kind, Link};

pub(super) enum Command {
    Subscribe(Uuid, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(Uuid),
}

/// Most (un)subscribes sent in one command.
const BATCH: usize = 512;

/// Applies (un)subscribes in request order, a run of the same kind as one command.
/// Nothing waits behind Redis: while it is down a subscribe fails at once (the connect
/// gets a quick 503) and an unsubscribe is deferred, retried first thing later (before
/// anything requested after it) until it goes through, unless a later subscribe of the
/// same session supersedes it.
pub(super) async fn run_commands(
    mut link: Link,
    sharded: bool,
    mut rx: mpsc::UnboundedReceiver<Command>,
    connected: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let kind = if sharded { Kind::Shard } else { Kind::Channel };
    let mut deferred: Vec<Uuid> = Vec::new();
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch: Vec<Command> = Vec::new();
        tokio::select! {
            _ = token.cancelled() => break,
            command = rx.recv() => match command {
                Some(c) => batch.push(c),
                None => break,
            },
            _ = retry.tick(), if !deferred.is_empty() => {}
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut ops: Vec<Command> = deferred.drain(..).map(Command::Unsubscribe).collect();
        ops.extend(batch);
        while !ops.is_empty() {
            let subscribing = matches!(ops[0], Command::Subscribe(..));
            let len = ops
                .iter()
                .take_while(|c| matches!(c, Command::Subscribe(..)) == subscribing)
                .count();
            let run: Vec<Command> = ops.drain(..len).collect();
            let up = connected.load(Ordering::Acquire);
            let sessions: Vec<Uuid> = run.iter().map(Command::session).collect();
            let channels = channels(&sessions, sharded);
            if subscribing {
                deferred.retain(|s| !sessions.contains(s));
                let result = if up {
                    match with_timeout(announce(&link, &sessions, sharded)).await {
                        Ok(()) => with_timeout(link.subscribe(kind, &channels)).await,
                        Err(e) => Err(e),
                    }
                } else {
                    Err(BrokerError::Unavailable)
                };
                if let Err(e) = &result {
                    tracing::warn!(sessions = sessions.len(), error = %e, "subscribe failed");
                }
                for command in run {
                    if let Command::Subscribe(_, ack) = command {
                        let _ = ack.send(result.clone());
                    }
                }
            } else {
                let done = up
                    && with_timeout(link.unsubscribe(kind, &channels))
                        .await
                        .is_ok();
                if !done {
                    tracing::debug!(sessions = sessions.len(), "unsubscribe deferred");
                    deferred.extend(sessions);
                }
            }
        }
    }
    tracing::debug!("redis command task stopped");
}

/// Tells every instance, before subscribing, that this one is about to serve these
/// sessions: an instance that is stopping then waits for this one's join request
/// instead of taking the new subscription for one that already serves the session.
/// Sent on the subscribing link, so Redis orders it before the subscription (on a
/// Cluster, each session's announcement goes to its own slot).
async fn announce(link: &Link, sessions: &[Uuid], sharded: bool) -> redis::RedisResult<()> {
    let pipes: Vec<redis::Pipeline> = if sharded {
        sessions
            .iter()
            .map(|session| {
                let mut pipe = redis::pipe();
                pipe.cmd("SPUBLISH")
                    .arg(sharded_join_channel(*session))
                    .arg(format!("{session} {SUBSCRIBING}"))
                    .ignore();
                pipe
            })
            .collect()
    } else {
        let mut pipe = redis::pipe();
        for session in sessions {
            pipe.publish(JOIN_CHANNEL, format!("{session} {SUBSCRIBING}"))
                .ignore();
        }
        vec![pipe]
    };
    link.each::<()>(&pipes).await.map(drop)
}

impl Command {
    fn session(&self) -> Uuid {
        match self {
            Self::Subscribe(s, _) | Self::Unsubscribe(s) => *s,
        }
    }
}

/// Each session's channels: chat and end, and with sharded pub/sub its join channel.
fn channels(sessions: &[Uuid], sharded: bool) -> Vec<String> {
    sessions
        .iter()
        .flat_map(|s| {
            let mut list = vec![chat_channel(*s), end_channel(*s)];
            if sharded {
                list.push(sharded_join_channel(*s));
            }
            list
        })
        .collect()
}

/// Subscribes to the join-request channel (and, for a history standby, to every
/// session's channel) once Redis is there; the link restores the subscriptions after
/// every reconnect. With sharded pub/sub, join requests come on each session's own
/// channel; this subscription then only counts the instances that listen.
pub(super) async fn listen_for_joins(
    mut link: Link,
    standby: bool,
    listening: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let mut channels = vec![JOIN_CHANNEL.to_string()];
    if standby {
        channels.push(STANDBY_CHANNEL.into());
    }
    let pattern = [SESSION_PATTERN.to_string()];
    let mut joins = false;
    loop {
        joins = joins
            || with_timeout(link.subscribe(Kind::Channel, &channels))
                .await
                .is_ok();
        if joins
            && (!standby
                || with_timeout(link.subscribe(Kind::Pattern, &pattern))
                    .await
                    .is_ok())
        {
            listening.store(true, Ordering::Release);
            return;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
}
