//! Stopping without loss: the instance keeps its sessions' history going (writes,
//! answers to join requests) until other instances took the sessions over.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::History;
use crate::broker::{Broker, JOIN_CHANNEL, chat_channel};

/// How often a stopping instance looks whether its sessions were taken over.
const HANDOVER_POLL: Duration = Duration::from_millis(100);
/// Another instance subscribed (without announcing a new subscription) this long was
/// already serving the session; the wait covers an announcement still on its way.
const SHARED_FOR: Duration = Duration::from_secs(1);

impl History {
    /// The instance starts stopping: only join requests answered from now on mean
    /// that a session was taken over (earlier ones, a joiner's own included, do not).
    pub fn stopping(&self) {
        self.take_answered();
        self.stopping.store(true, Ordering::Release);
    }

    /// A stopping instance keeps its subscriptions, its writes and its answers to join
    /// requests until each session that had viewers was taken over by another
    /// instance (it answered that instance's join request, or another instance
    /// already served it: subscribed without having announced a new subscription),
    /// or until `limit`: a viewer that moves on then resumes exactly.
    pub async fn handover(&self, broker: &Broker, sessions: Vec<Uuid>, limit: Duration) {
        if !self.enabled() || sessions.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut left: HashMap<Uuid, Option<Instant>> =
            sessions.into_iter().map(|s| (s, None)).collect();
        let total = left.len();
        while !left.is_empty() && started.elapsed() < limit {
            tokio::time::sleep(HANDOVER_POLL).await;
            for session in self.take_answered() {
                left.remove(&session);
            }
            let ids: Vec<Uuid> = left.keys().copied().collect();
            let mut channels: Vec<String> = ids.iter().map(|s| chat_channel(*s)).collect();
            channels.push(JOIN_CHANNEL.into());
            let Ok(mut counts) = broker.subscriber_counts(&channels).await else {
                continue;
            };
            if counts.pop().unwrap_or(0) <= 1 {
                // No other instance is listening: nobody can take over.
                break;
            }
            let now = Instant::now();
            let subscribing = self.subscribing.lock().unwrap().clone();
            for (id, n) in ids.into_iter().zip(counts) {
                let shared = left.get_mut(&id).expect("listed");
                match (n >= 2 && !subscribing.contains(&id), *shared) {
                    (false, _) => *shared = None,
                    (true, None) => *shared = Some(now),
                    (true, Some(since)) if now.duration_since(since) >= SHARED_FOR => {
                        left.remove(&id);
                    }
                    _ => {}
                }
            }
        }
        tracing::info!(
            sessions = total,
            not_taken_over = left.len(),
            took = ?started.elapsed(),
            "history handover done"
        );
    }
}
