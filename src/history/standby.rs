//! `HISTORY_STANDBY`: this instance also listens to every session (one pattern
//! subscription) and writes the shared history of the sessions it does not serve, so
//! that a session whose instance is killed can be joined exactly by the next one (the
//! standby answers its join request). The cost: every message also reaches this
//! instance, and one script call per active session per tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use super::store::Item;
use crate::broker::{BrokerEvent, JOIN_CHANNEL, SESSION_PATTERN};
use crate::metrics::Metrics;
use crate::position::Fingerprinter;
use crate::session::Sessions;

/// A session not heard from for this long is forgotten.
const IDLE: Duration = Duration::from_secs(600);

/// One session watched for the history.
struct Watch {
    fingerprints: Fingerprinter,
    items: Vec<Item>,
    bytes: usize,
    last: Instant,
}

/// All watched sessions: what each holds between two writes, and the sum.
#[derive(Default)]
struct Watches {
    map: HashMap<Uuid, Watch>,
    bytes: usize,
}

/// Payload bytes all watches may hold between two writes (Redis slow or away).
const MAX_BYTES: usize = 64 << 20;

pub struct Standby {
    watches: Mutex<Watches>,
    /// Sessions served here write their own history.
    sessions: Arc<Sessions>,
    max_sessions: usize,
    /// Bytes a watch may hold between two writes (as a session's inbox).
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Standby {
    pub fn new(
        sessions: Arc<Sessions>,
        max_sessions: usize,
        max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            watches: Mutex::new(Watches::default()),
            sessions,
            max_sessions,
            max_bytes,
            metrics,
        }
    }

    /// Takes what the broker delivered; runs on the broker's task, never waits.
    pub fn on_broker_event(&self, event: &BrokerEvent<'_>) {
        match event {
            BrokerEvent::Pattern { channel, payload } => self.on_message(channel, payload),
            BrokerEvent::Message { channel, payload } if *channel == JOIN_CHANNEL.as_bytes() => {
                if let Some((session, ask)) = crate::session::parse_join_request(payload)
                    && let Some(watch) = self.watches.lock().unwrap().map.get_mut(&session)
                {
                    watch.items.push(Item::Ask(ask));
                }
            }
            BrokerEvent::Message { .. } => {}
            BrokerEvent::Restored { channel } if *channel != SESSION_PATTERN.as_bytes() => {}
            BrokerEvent::Disconnected | BrokerEvent::Restored { .. } => {
                for watch in self.watches.lock().unwrap().map.values_mut() {
                    watch.fingerprints.gap();
                    watch.items.push(Item::Gap);
                }
            }
        }
    }

    fn on_message(&self, channel: &[u8], payload: &Bytes) {
        let Ok(session) = Uuid::try_parse_ascii(channel) else {
            return;
        };
        if self.served_here(session) {
            return;
        }
        let mut watches = self.watches.lock().unwrap();
        let Watches { map, bytes } = &mut *watches;
        if !map.contains_key(&session) && map.len() >= self.max_sessions {
            self.metrics.drop_message("standby_full");
            return;
        }
        let watch = map.entry(session).or_insert_with(|| Watch {
            fingerprints: Fingerprinter::default(),
            items: Vec::new(),
            bytes: 0,
            last: Instant::now(),
        });
        watch.last = Instant::now();
        if watch.bytes + payload.len() > self.max_bytes || *bytes + payload.len() > MAX_BYTES {
            // As a full inbox: the history gets a gap here rather than unbounded memory.
            *bytes -= watch.bytes;
            watch.items.clear();
            watch.bytes = 0;
            watch.fingerprints.gap();
            watch.items.push(Item::Gap);
            return;
        }
        watch.bytes += payload.len();
        *bytes += payload.len();
        let fp = watch.fingerprints.next(payload);
        watch.items.push(Item::Message(fp, payload.clone()));
    }

    /// Served here and joined: its own writer takes over. Until it joined, the watch
    /// goes on, so that it can answer this instance's own join request.
    fn served_here(&self, session: Uuid) -> bool {
        self.sessions
            .map
            .get(&session)
            .is_some_and(|s| s.joined.initialized())
    }

    /// What arrived since the last call, per session, for the history writer; and the
    /// sessions forgotten (idle, or now served here) whose cursors can go.
    pub fn drain(&self) -> (Vec<(Uuid, Vec<Item>)>, Vec<Uuid>) {
        let now = Instant::now();
        let mut watches = self.watches.lock().unwrap();
        watches.bytes = 0;
        let mut gone = Vec::new();
        watches.map.retain(|id, watch| {
            let keep = now.duration_since(watch.last) < IDLE && !self.served_here(*id);
            if !keep {
                gone.push(*id);
            }
            keep
        });
        let runs = watches
            .map
            .iter_mut()
            .filter(|(_, w)| !w.items.is_empty())
            .map(|(id, w)| {
                w.bytes = 0;
                (*id, std::mem::take(&mut w.items))
            })
            .collect();
        (runs, gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(max_bytes: usize) -> Standby {
        let metrics = Arc::new(Metrics::new());
        let sessions = Arc::new(Sessions::new(1 << 20, 1 << 30, metrics.clone()));
        Standby::new(sessions, 100_000, max_bytes, metrics)
    }

    fn pattern<'a>(channel: &'a [u8], payload: &Bytes) -> BrokerEvent<'a> {
        BrokerEvent::Pattern {
            channel,
            payload: payload.clone(),
        }
    }

    #[test]
    fn what_waits_for_redis_is_bounded_per_session_and_in_all() {
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        // One session: at most its own bound, then a gap.
        let s = standby(4 << 20);
        let one = Uuid::new_v4().to_string();
        for _ in 0..10 {
            s.on_broker_event(&pattern(one.as_bytes(), &big));
        }
        let held = s.watches.lock().unwrap().bytes;
        assert!(held <= 4 << 20, "{held}");
        // Many sessions: at most MAX_BYTES over all of them.
        let s = standby(4 << 20);
        let ids: Vec<String> = (0..100).map(|_| Uuid::new_v4().to_string()).collect();
        for id in &ids {
            s.on_broker_event(&pattern(id.as_bytes(), &big));
        }
        let held = s.watches.lock().unwrap().bytes;
        assert!(held <= MAX_BYTES, "{held}");
        let (runs, _) = s.drain();
        assert!(
            runs.iter()
                .any(|(_, items)| matches!(items[..], [Item::Gap])),
            "the sessions beyond the bound got a gap"
        );
        assert_eq!(s.watches.lock().unwrap().bytes, 0, "drained");
    }
}
