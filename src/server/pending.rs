//! Connections that have not sent a complete request head yet. They cost a socket
//! and a task each and do nothing for anyone, so they are bounded: at most
//! `MAX_PENDING_CONNECTIONS` at once, each for at most `HEADER_TIMEOUT_MS` from its
//! accept. When the table is full, the oldest is closed to admit the newest: a client
//! holding many half-sent requests cannot lock out health checks and viewers, whose
//! heads arrive at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

pub struct Pending {
    table: Mutex<Table>,
    max: usize,
    gauge: Gauge,
    evicted: Counter,
}

#[derive(Default)]
struct Table {
    next: u64,
    live: HashMap<u64, CancellationToken>,
    /// Ids in accept order; some may have left already (skipped when evicting).
    order: VecDeque<u64>,
}

/// A connection's place in the table; leaving it (drop) frees the place.
pub struct PendingGuard {
    pending: Arc<Pending>,
    id: u64,
    pub(super) evicted: CancellationToken,
}

impl Pending {
    pub fn new(max: usize, gauge: Gauge, evicted: Counter) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            max,
            gauge,
            evicted,
        })
    }

    /// Enters a newly accepted connection, closing the oldest one if the table is full.
    pub fn enter(self: &Arc<Self>) -> PendingGuard {
        let mut table = self.table.lock().unwrap();
        while table.live.len() >= self.max {
            let Some(oldest) = table.order.pop_front() else {
                break;
            };
            if let Some(token) = table.live.remove(&oldest) {
                token.cancel();
                self.evicted.inc();
            }
        }
        table.next += 1;
        let id = table.next;
        let evicted = CancellationToken::new();
        table.live.insert(id, evicted.clone());
        table.order.push_back(id);
        // Ids of connections that left keep the queue long; trim it when it is mostly
        // stale, so it stays proportional to the table.
        if table.order.len() > 2 * self.max.max(16) {
            let Table { live, order, .. } = &mut *table;
            order.retain(|id| live.contains_key(id));
        }
        self.gauge.set(table.live.len() as i64);
        PendingGuard {
            pending: self.clone(),
            id,
            evicted,
        }
    }

    pub fn count(&self) -> usize {
        self.table.lock().unwrap().live.len()
    }
}

impl PendingGuard {
    /// Resolves when the connection was closed to make room for a newer one.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await;
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut table = self.pending.table.lock().unwrap();
        table.live.remove(&self.id);
        self.pending.gauge.set(table.live.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_closes_its_oldest_entry() {
        let pending = Pending::new(2, Gauge::default(), Counter::default());
        let a = pending.enter();
        let b = pending.enter();
        assert!(!a.evicted.is_cancelled());
        let c = pending.enter();
        assert!(a.evicted.is_cancelled(), "the oldest made room");
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(pending.count(), 2);
        drop(b);
        let _d = pending.enter();
        assert!(!c.evicted.is_cancelled(), "a free place is used first");
        assert_eq!(pending.evicted.get(), 1);
    }

    #[test]
    fn the_queue_stays_proportional_to_the_table() {
        let pending = Pending::new(4, Gauge::default(), Counter::default());
        for _ in 0..10_000 {
            drop(pending.enter());
        }
        assert!(pending.table.lock().unwrap().order.len() <= 2 * 16 + 1);
        assert_eq!(pending.count(), 0);
    }
}
