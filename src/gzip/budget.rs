//! How many compressors all sessions may run at once, in bytes of memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// What one compressor holds while it runs, as counted against the budget: zlib-rs at
/// level 6 keeps a 32 KiB window twice over, 128 KiB of hash chains and 64 KiB of
/// pending symbols; about 300 KiB with its state, as measured (README).
pub const COMPRESSOR_BYTES: usize = 300 * 1024;

/// The compressors all sessions may run at once (`GZIP_MEMORY_BYTES`). Each session,
/// and each of its delivery classes with gzip viewers, runs one while it sends, so
/// clients could otherwise make the server hold one per class of every session. When
/// none is free, a stream's frames go out as stored blocks instead: still a valid gzip
/// stream, only not smaller, until a compressor is given back (a session that goes
/// quiet, or whose gzip viewers all left, gives its back).
#[derive(Clone)]
pub struct Budget(Arc<BudgetState>);

struct BudgetState {
    limit: AtomicUsize,
    held: AtomicUsize,
    /// Compressors running now.
    running: Gauge,
    /// Frames sent as stored blocks because every compressor was taken.
    refused: Counter,
}

impl Default for Budget {
    /// No limit (tests, tools): the server sets its own from the configuration.
    fn default() -> Self {
        Self(Arc::new(BudgetState {
            limit: AtomicUsize::new(usize::MAX),
            held: AtomicUsize::new(0),
            running: Gauge::default(),
            refused: Counter::default(),
        }))
    }
}

impl Budget {
    /// Allows as many compressors as fit in `bytes`.
    pub fn set_bytes(&self, bytes: usize) {
        self.0
            .limit
            .store(bytes / COMPRESSOR_BYTES, Ordering::Relaxed);
    }

    pub fn running(&self) -> Gauge {
        self.0.running.clone()
    }

    pub fn refused(&self) -> Counter {
        self.0.refused.clone()
    }

    /// A compressor's place, unless all are taken.
    pub(super) fn lease(&self) -> Option<Lease> {
        let limit = self.0.limit.load(Ordering::Relaxed);
        let taken = self
            .0
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < limit).then_some(held + 1)
            });
        if taken.is_err() {
            self.0.refused.inc();
            return None;
        }
        self.0.running.inc();
        Some(Lease(self.clone()))
    }
}

/// One compressor's place in the budget, given back when dropped.
pub(super) struct Lease(Budget);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.0.held.fetch_sub(1, Ordering::AcqRel);
        self.0.0.running.dec();
    }
}
