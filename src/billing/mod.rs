//! Usage metering: the number of chat messages the ticker captured per session, POSTed
//! as `{"sessionId": "<uuid>", "count": n}` to `{TENANT_BASE_URL}/api/v1/billings`
//! (the original's endpoint and body).
//!
//! Unlike the original (one request per session per tick, lost on any error), counts
//! accumulate and are flushed once per `BILLING_FLUSH_MS`, one request per session with
//! something to report. A failed or timed-out request keeps its count for the next
//! flush, with backoff; `404`/`410` means the tenant does not know the session, and
//! that count is logged and dropped. The tick loop only appends to an in-memory ledger
//! and never waits on the tenant. Several instances serving one session bill it once:
//! see `ledger` and `lease`.

mod lease;
mod ledger;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::fanout::Usage;
use crate::metrics::{Metrics, Outcome};
pub use lease::Lease;
use ledger::{Ledger, Report};

/// Requests to the tenant in flight at once during a flush.
const CONCURRENCY: usize = 16;
/// Longest pause between flushes while the tenant keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot set up the Redis lease connection: {0}")]
    Redis(#[from] redis::RedisError),
}

/// How the tenant answered one report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    /// `404`/`410`: the tenant does not know this session; retrying cannot help.
    UnknownSession,
    Failed,
}

pub struct Billing {
    ledgers: Mutex<HashMap<Uuid, Ledger>>,
    client: reqwest::Client,
    /// `{TENANT_BASE_URL}/api/v1/billings`; `None`: count in metrics, send nothing.
    endpoint: Option<String>,
    lease: Lease,
    flush: Duration,
    /// How long a non-holder keeps fingerprints for a possible takeover.
    window: Duration,
    metrics: Arc<Metrics>,
}

impl Billing {
    pub fn new(
        config: &Config,
        owner: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BillingError> {
        let flush = config.billing_flush;
        let ttl = flush * 3 + Duration::from_secs(1);
        let lease = match &config.redis {
            Some(info) => Lease::redis(info.clone(), owner, ttl)?,
            None => Lease::Solo,
        };
        Ok(Self {
            ledgers: Mutex::new(HashMap::new()),
            client: reqwest::Client::builder()
                .timeout(config.billing_timeout)
                .connect_timeout(config.billing_timeout.min(Duration::from_secs(3)))
                .build()?,
            endpoint: config
                .tenant_base_url
                .as_ref()
                .map(|base| format!("{base}/api/v1/billings")),
            lease,
            flush,
            window: (ttl * 4).max(Duration::from_secs(10)),
            metrics,
        })
    }

    /// Flushes every `BILLING_FLUSH_MS`, backing off while the tenant fails.
    pub async fn run(self: Arc<Self>, token: CancellationToken) {
        if self.endpoint.is_none() {
            return;
        }
        let mut delay = self.flush;
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = if self.flush_once().await {
                self.flush
            } else {
                (delay * 2).min(MAX_BACKOFF)
            };
            self.metrics.billing_flushes.inc();
        }
        tracing::debug!("billing loop stopped");
    }

    /// The last flush at shutdown: everything is settled and every lease released, so
    /// another instance can take over at once.
    pub async fn shutdown(&self) {
        if self.endpoint.is_none() {
            return;
        }
        for ledger in self.ledgers.lock().unwrap().values_mut() {
            ledger.closed = true;
        }
        if !self.flush_once().await {
            tracing::warn!(
                pending = self.metrics.billing_pending.get(),
                "usage left unbilled at shutdown"
            );
        }
    }

    /// One flush over every session; false if anything must be retried.
    pub async fn flush_once(&self) -> bool {
        let Some(endpoint) = &self.endpoint else {
            return true;
        };
        let sessions: Vec<Uuid> = self.ledgers.lock().unwrap().keys().copied().collect();
        if sessions.is_empty() {
            return true;
        }
        let held = match self.lease.acquire(&sessions).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "billing lease unavailable; retrying");
                return false;
            }
        };
        let taking_over: Vec<Uuid> = {
            let ledgers = self.ledgers.lock().unwrap();
            sessions
                .iter()
                .zip(&held)
                .filter(|(s, held)| **held && ledgers.get(s).is_some_and(|l| !l.holder))
                .map(|(s, _)| *s)
                .collect()
        };
        let cursors = match self.lease.cursors(&taking_over).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "billing cursors unavailable; retrying");
                return false;
            }
        };
        let cursors: HashMap<Uuid, Option<u64>> = taking_over.into_iter().zip(cursors).collect();

        let now = Instant::now();
        let mut reports = Vec::new();
        let mut released = Vec::new();
        {
            let mut ledgers = self.ledgers.lock().unwrap();
            for (session, held) in sessions.iter().zip(held) {
                let Some(ledger) = ledgers.get_mut(session) else {
                    continue;
                };
                if !held {
                    ledger.follow(now, self.window);
                } else if let Some(cursor) = cursors.get(session) {
                    ledger.take_over(*cursor);
                }
                match ledger.report() {
                    Some(report) => reports.push((*session, report)),
                    None if ledger.closed => {
                        if ledger.holder {
                            released.push(*session);
                        }
                        ledgers.remove(session);
                    }
                    None => {}
                }
            }
        }

        let answers: Vec<(Uuid, Report, Answer)> = futures::stream::iter(reports)
            .map(|(session, report)| async move {
                (
                    session,
                    report,
                    self.send(endpoint, session, report.count).await,
                )
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;

        let mut cursors = Vec::new();
        let mut all_ok = true;
        {
            let mut ledgers = self.ledgers.lock().unwrap();
            for (session, report, answer) in answers {
                if answer == Answer::Failed {
                    all_ok = false;
                    continue;
                }
                let Some(ledger) = ledgers.get_mut(&session) else {
                    continue;
                };
                ledger.settle(report);
                cursors.extend(report.cursor.map(|c| (session, c)));
                if ledger.closed && ledger.report().is_none() {
                    released.push(session);
                    ledgers.remove(&session);
                }
            }
            let pending: u64 = ledgers.values().map(Ledger::unbilled).sum();
            self.metrics.billing_pending.set(pending as i64);
        }
        if let Err(e) = self.lease.set_cursors(&cursors).await {
            tracing::warn!(error = %e, "could not record billing cursors");
        }
        if let Err(e) = self.lease.release(&released).await {
            tracing::warn!(error = %e, "could not release billing leases");
        }
        all_ok
    }

    async fn send(&self, endpoint: &str, session: Uuid, count: u64) -> Answer {
        let body = serde_json::json!({ "sessionId": session, "count": count });
        let result = self.client.post(endpoint).json(&body).send().await;
        let answer = match &result {
            Ok(r) if r.status().is_success() => Answer::Accepted,
            Ok(r) if matches!(r.status().as_u16(), 404 | 410) => {
                tracing::warn!(%session, count, status = %r.status(), "tenant does not know the session; usage dropped");
                Answer::UnknownSession
            }
            Ok(r) => {
                tracing::warn!(%session, count, status = %r.status(), "billing request refused; will retry");
                Answer::Failed
            }
            Err(e) => {
                tracing::warn!(%session, count, error = %e, "billing request failed; will retry");
                Answer::Failed
            }
        };
        let outcome = match answer {
            Answer::Accepted => "accepted",
            Answer::UnknownSession => "dropped",
            Answer::Failed => "failed",
        };
        self.metrics
            .billing_requests
            .get_or_create(&Outcome { outcome })
            .inc();
        answer
    }
}

impl Usage for Billing {
    fn captured(&self, session: Uuid, payloads: &[Bytes]) {
        if self.endpoint.is_none() {
            return;
        }
        let mut ledgers = self.ledgers.lock().unwrap();
        let ledger = ledgers.entry(session).or_default();
        ledger.closed = false;
        ledger.record(payloads, Instant::now());
    }

    fn closed(&self, session: Uuid) {
        if let Some(ledger) = self.ledgers.lock().unwrap().get_mut(&session) {
            ledger.closed = true;
        }
    }
}
