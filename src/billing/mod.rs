//! Usage metering: the number of chat messages the ticker captured per session, POSTed
//! as `{"sessionId": "<uuid>", "count": n}` to `{TENANT_BASE_URL}/api/v1/billings`
//! (the original's endpoint and body).
//!
//! Unlike the original (one request per session per tick, lost on any error), counts
//! accumulate and are reported once per `BILLING_FLUSH_MS`, one request per session
//! with something to report. Every flush, what the ticker captured is counted into a
//! store shared by all instances (`store`), which counts each message once however
//! many instances received it (`ledger` names messages by their payload). Reports are
//! taken from that store, so usage counted by an instance survives its death and a
//! tenant outage: a failed or timed-out report goes back to the store and is retried
//! with backoff, while counting goes on. `404`/`410` means the tenant does not know the
//! session; that count is logged and dropped. The tick loop only appends to an
//! in-memory ledger and never waits, on the store or on the tenant.

mod ledger;
mod scripts;
mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::Config;
use crate::fanout::Usage;
use crate::metrics::{Metrics, Outcome};
use crate::topology::Redis;
use ledger::{Ledger, Report};
use store::UsageStore;

/// Requests to the tenant in flight at once during a round.
const CONCURRENCY: usize = 16;
/// Longest pause between report rounds while the tenant keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a fingerprint is remembered for deduplication: far longer than two
/// instances can differ in when they count the same message (one flush each).
const MIN_DEDUP_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot set up the Redis usage store: {0}")]
    Redis(#[from] redis::RedisError),
}

/// How the tenant answered one report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    /// `404`/`410`: the tenant does not know this session; retrying cannot help.
    UnknownSession,
    /// An error status, or no connection: not counted; the count goes back to pending.
    Refused,
    /// Sent, but no answer (timeout, connection lost): it may have been counted, so
    /// the same report is sent again, with the same key.
    Lost,
}

pub struct Billing {
    ledgers: Mutex<HashMap<Uuid, Ledger>>,
    client: reqwest::Client,
    /// `{TENANT_BASE_URL}/api/v1/billings`; `None`: count in metrics, send nothing.
    endpoint: Option<String>,
    store: UsageStore,
    /// Names this process in idempotency keys.
    owner: String,
    reports_sent: AtomicU64,
    flush: Duration,
    /// How long fingerprints are remembered, here and in the store.
    window: Duration,
    metrics: Arc<Metrics>,
}

impl Billing {
    pub fn new(
        config: &Config,
        redis: Option<&Redis>,
        tasks: &TaskTracker,
        owner: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BillingError> {
        let flush = config.billing_flush;
        // Outlives a report in flight and a few missed refreshes.
        let alive_ttl = flush * 3 + config.billing_timeout + Duration::from_secs(2);
        let store = match redis {
            Some(redis) => UsageStore::redis(redis, tasks, owner.clone(), alive_ttl)?,
            None => UsageStore::local(),
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
            store,
            owner,
            reports_sent: AtomicU64::new(0),
            flush,
            window: (flush * 10).max(MIN_DEDUP_WINDOW),
            metrics,
        })
    }

    /// Every `BILLING_FLUSH_MS`: counts what was captured into the store, then, unless
    /// a round is still running or the tenant is in backoff, reports what is pending.
    /// Counting never waits for the tenant, so a tenant outage costs retries, not
    /// counts, and an instance that dies during one leaves its usage in the store.
    pub async fn run(self: Arc<Self>, token: CancellationToken) {
        if self.endpoint.is_none() {
            return;
        }
        let mut interval = tokio::time::interval(self.flush);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: Option<tokio::task::JoinHandle<bool>> = None;
        let (mut next_round, mut backoff) = (Instant::now(), self.flush);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = interval.tick() => {}
            }
            self.account().await;
            if let Some(done) = round.take_if(|r| r.is_finished()) {
                self.metrics.billing_flushes.inc();
                if done.await.unwrap_or(false) {
                    backoff = self.flush;
                    next_round = Instant::now();
                } else {
                    next_round = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            if round.is_none() && Instant::now() >= next_round {
                round = Some(tokio::spawn(self.clone().report()));
            }
        }
        if let Some(round) = round {
            let _ = round.await;
        }
        tracing::debug!("billing loop stopped");
    }

    /// The last round at shutdown: everything captured is counted and reported. What
    /// the tenant does not accept now stays in the store (with Redis) for another
    /// instance, or this one's next start, to report.
    pub async fn shutdown(self: &Arc<Self>) {
        if self.endpoint.is_none() {
            return;
        }
        for ledger in self.ledgers.lock().unwrap().values_mut() {
            ledger.closed = true;
        }
        self.account().await;
        if !self.clone().report().await {
            tracing::warn!(
                pending = self.metrics.billing_pending.get(),
                "usage left unreported at shutdown"
            );
        }
    }

    /// Counts every session's new fingerprints into the store.
    async fn account(&self) {
        let batches: Vec<(Uuid, Vec<u64>)> = {
            let ledgers = self.ledgers.lock().unwrap();
            ledgers
                .iter()
                .map(|(s, l)| (*s, l.unaccounted()))
                .filter(|(_, fps)| !fps.is_empty())
                .collect()
        };
        match self.store.account(&batches, self.window).await {
            Ok(accounted) => {
                if accounted.store_reset {
                    tracing::error!(
                        "the usage store lost its state (Redis restarted without persistence): \
                         usage it held unreported is lost; run Redis with appendonly yes"
                    );
                    self.metrics.billing_store_resets.inc();
                }
                let mut ledgers = self.ledgers.lock().unwrap();
                for ((session, fps), added) in batches.iter().zip(accounted.added) {
                    if let Some(ledger) = ledgers.get_mut(session) {
                        ledger.accounted(fps.len());
                        ledger.dirty |= added > 0;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "usage store unavailable; counting later"),
        }
        self.update_pending();
    }

    /// One round of reports: records answers not yet recorded, sends again the reports
    /// whose answer was lost, takes what is pending for this instance's sessions (and
    /// some left by others), reports it and records the answers. False if anything
    /// must be retried.
    async fn report(self: Arc<Self>) -> bool {
        let Some(endpoint) = &self.endpoint else {
            return true;
        };
        if !self.settle_unacked().await {
            return false;
        }
        let (mut reports, sessions) = self.due().await;
        let taken = match self.store.take(&sessions).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %e, "usage store unavailable; reporting later");
                return false;
            }
        };
        {
            let mut ledgers = self.ledgers.lock().unwrap();
            for (session, count) in sessions.into_iter().zip(taken) {
                if count == 0 {
                    // Nothing left, or another instance reports it now.
                    if let Some(l) = ledgers.get_mut(&session) {
                        l.dirty = false;
                        l.refused = 0;
                    }
                } else {
                    let n = self.reports_sent.fetch_add(1, Ordering::Relaxed);
                    let key = format!("{}:{session}:{n}", self.owner);
                    reports.push((session, Report { count, key }));
                }
            }
        }
        let this = &self;
        let answers: Vec<(Uuid, Report, Answer)> = futures::stream::iter(reports)
            .map(|(session, report)| async move {
                let answer = this.send(endpoint, session, &report).await;
                (session, report, answer)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        self.record(answers).await
    }

    /// Records reports the tenant answered whose settling the store missed.
    async fn settle_unacked(&self) -> bool {
        let unacked: Vec<Uuid> = {
            let ledgers = self.ledgers.lock().unwrap();
            ledgers
                .iter()
                .filter(|(_, l)| l.unacked.is_some())
                .map(|(s, _)| *s)
                .collect()
        };
        if let Err(e) = self.store.settle(&unacked).await {
            tracing::warn!(error = %e, "usage store unavailable; settling later");
            return false;
        }
        let mut ledgers = self.ledgers.lock().unwrap();
        for s in &unacked {
            if let Some(l) = ledgers.get_mut(s) {
                l.unacked = None;
            }
        }
        true
    }

    /// Reports to send again as they were, and sessions to take usage from.
    async fn due(&self) -> (Vec<(Uuid, Report)>, Vec<Uuid>) {
        let (again, mut sessions): (Vec<(Uuid, Report)>, Vec<Uuid>) = {
            let ledgers = self.ledgers.lock().unwrap();
            let again = ledgers
                .iter()
                .filter_map(|(s, l)| l.unanswered.clone().map(|r| (*s, r)))
                .collect();
            let dirty = ledgers
                .iter()
                .filter(|(_, l)| l.dirty && l.unanswered.is_none())
                .map(|(s, _)| *s)
                .collect();
            (again, dirty)
        };
        match self.store.unsettled_sample().await {
            Ok(more) => {
                for s in more {
                    if !sessions.contains(&s) && !again.iter().any(|(a, _)| *a == s) {
                        sessions.push(s);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list unsettled usage"),
        }
        (again, sessions)
    }

    /// Settles what the tenant answered for good, gives back what it refused, and keeps
    /// what got no answer to send again as it was.
    async fn record(&self, answers: Vec<(Uuid, Report, Answer)>) -> bool {
        let of = |wanted: &[Answer]| -> Vec<Uuid> {
            answers
                .iter()
                .filter(|(.., a)| wanted.contains(a))
                .map(|(s, ..)| *s)
                .collect()
        };
        let settled = self
            .store
            .settle(&of(&[Answer::Accepted, Answer::UnknownSession]))
            .await;
        if let Err(e) = &settled {
            tracing::warn!(error = %e, "could not record accepted reports; retrying");
        }
        let refused = of(&[Answer::Refused]);
        if let Err(e) = self.store.give_back(&refused).await {
            // Ours stays in flight in the store; the next take includes it again.
            tracing::warn!(error = %e, "could not give back refused reports");
        }
        let mut all_done = settled.is_ok() && refused.is_empty();
        {
            let mut ledgers = self.ledgers.lock().unwrap();
            for (session, report, answer) in answers {
                // Usage another instance left: tracked here only until it is settled.
                let ledger = ledgers.entry(session).or_insert_with(Ledger::orphan);
                ledger.dirty = true;
                ledger.refused = 0;
                ledger.unanswered = None;
                match answer {
                    Answer::Accepted | Answer::UnknownSession if settled.is_err() => {
                        ledger.unacked = Some(report.count);
                    }
                    Answer::Accepted | Answer::UnknownSession => {}
                    Answer::Refused => ledger.refused = report.count,
                    Answer::Lost => {
                        all_done = false;
                        ledger.unanswered = Some(report);
                    }
                }
            }
            ledgers.retain(|_, l| !(l.closed && l.is_settled() && l.refused == 0));
        }
        self.update_pending();
        all_done
    }

    fn update_pending(&self) {
        let ledgers = self.ledgers.lock().unwrap();
        let pending: u64 = ledgers.values().map(Ledger::pending).sum();
        let uncounted: u64 = ledgers.values().map(Ledger::uncounted).sum();
        self.metrics.billing_pending.set(pending as i64);
        self.metrics.billing_uncounted.set(uncounted as i64);
    }

    /// Sends one report. Its `Idempotency-Key` is the same each time the same report
    /// is sent again, so a tenant that honours the header counts it once even when an
    /// answer was lost (the original tenant ignores it: at-least-once then).
    async fn send(&self, endpoint: &str, session: Uuid, report: &Report) -> Answer {
        let count = report.count;
        let body = serde_json::json!({ "sessionId": session, "count": count });
        let result = self
            .client
            .post(endpoint)
            .header("idempotency-key", &report.key)
            .json(&body)
            .send()
            .await;
        let answer = match &result {
            Ok(r) if r.status().is_success() => Answer::Accepted,
            Ok(r) if matches!(r.status().as_u16(), 404 | 410) => {
                tracing::warn!(%session, count, status = %r.status(), "tenant does not know the session; usage dropped");
                Answer::UnknownSession
            }
            Ok(r) => {
                tracing::warn!(%session, count, status = %r.status(), "billing request refused; will retry");
                Answer::Refused
            }
            // Never connected: the tenant cannot have counted it.
            Err(e) if e.is_connect() => {
                tracing::warn!(%session, count, error = %e, "tenant unreachable; will retry");
                Answer::Refused
            }
            Err(e) => {
                tracing::warn!(%session, count, error = %e, "billing request got no answer; will send it again");
                Answer::Lost
            }
        };
        tracing::debug!(%session, count, key = %report.key, ?answer, "usage reported");
        let outcome = match answer {
            Answer::Accepted => "accepted",
            Answer::UnknownSession => "dropped",
            Answer::Refused | Answer::Lost => "failed",
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
        let dropped = ledger.record(payloads, Instant::now(), self.window);
        // Under the ledgers' lock, as `update_pending` sets it: the gauge stays exact.
        self.metrics
            .billing_uncounted
            .inc_by(payloads.len() as i64 - dropped as i64);
        if dropped > 0 {
            tracing::warn!(%session, dropped, "usage store unreachable for long; oldest usage dropped");
            self.metrics.billing_dropped.inc_by(dropped);
        }
    }

    fn closed(&self, session: Uuid) {
        if let Some(ledger) = self.ledgers.lock().unwrap().get_mut(&session) {
            ledger.closed = true;
        }
    }
}
