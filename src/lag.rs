//! Runtime lag: how much later than asked a task of this process gets to run. A busy
//! runtime (a big fan-out on every worker) delays every task, the Redis connection's
//! included, so a late reply is not evidence that Redis is gone; this measures the
//! delay itself, for operators (`chat_sync_runtime_lag_seconds`, `/readyz`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the lag is measured.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// Sleeps `PROBE_EVERY` over and over, recording how late each wake-up was.
pub async fn probe(metrics: Arc<Metrics>, token: CancellationToken) {
    loop {
        let asked = Instant::now() + PROBE_EVERY;
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep_until(asked) => {}
        }
        let lag = Instant::now().saturating_duration_since(asked);
        metrics.runtime_lag.observe(lag.as_secs_f64());
        metrics.runtime_lag_ms.set(lag.as_millis() as i64);
    }
}
