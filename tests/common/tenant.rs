//! A stand-in for the tenant backend: records the usage reports it receives and can be
//! told to fail, or stop listening, for a while.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use tokio::task::JoinHandle;
use uuid::Uuid;

#[derive(Default)]
struct Shared {
    /// Accepted reports: (sessionId, count, idempotency key).
    accepted: Mutex<Vec<(Uuid, u64, String)>>,
    /// Requests answered with an error.
    refused: Mutex<u64>,
    /// The status to answer with; 200 unless a test says otherwise.
    status: AtomicU16,
    /// Idempotency keys of accepted reports: a report sent again is answered, not
    /// counted again (as a tenant that honours the header would).
    keys: Mutex<std::collections::HashSet<String>>,
    /// Reports that get counted but whose answer comes only after this long.
    slow: Mutex<Option<(usize, std::time::Duration)>>,
    /// Reports that came again with a key already counted.
    repeats: AtomicU16,
    /// Gone: connections already open (which outlive the listener) get 503.
    away: std::sync::atomic::AtomicBool,
}

pub struct Tenant {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

impl Tenant {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            status: AtomicU16::new(200),
            ..Shared::default()
        });
        let mut tenant = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            shared,
            server: None,
        };
        tenant.listen().await;
        tenant
    }

    async fn listen(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/api/v1/billings", post(billings))
            .with_state(self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        }));
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer every report with `status` from now on.
    pub fn answer(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// Stops listening (connections are refused) until [`Tenant::resume`].
    pub fn go_away(&mut self) {
        self.shared.away.store(true, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&mut self) {
        for _ in 0..100 {
            if tokio::net::TcpListener::bind(self.addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.listen().await;
        self.shared.away.store(false, Ordering::SeqCst);
    }

    pub fn total(&self, session: Uuid) -> u64 {
        self.reports(session).iter().sum()
    }

    pub fn reports(&self, session: Uuid) -> Vec<u64> {
        self.keyed_reports(session)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// The accepted reports of `session` with their keys (which name the instance
    /// that sent each), for a failing test to show.
    pub fn keyed_reports(&self, session: Uuid) -> Vec<(u64, String)> {
        let accepted = self.shared.accepted.lock().unwrap();
        accepted
            .iter()
            .filter(|(s, ..)| *s == session)
            .map(|(_, n, key)| (*n, key.clone()))
            .collect()
    }

    pub fn refused(&self) -> u64 {
        *self.shared.refused.lock().unwrap()
    }

    /// The next `n` reports are counted, but answered only after `delay` (longer than
    /// the client waits: the answer is lost).
    pub fn answer_late(&self, n: usize, delay: std::time::Duration) {
        *self.shared.slow.lock().unwrap() = Some((n, delay));
    }

    /// Reports received again with a key already counted.
    pub fn repeats(&self) -> u16 {
        self.shared.repeats.load(Ordering::SeqCst)
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        self.go_away();
    }
}

async fn billings(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> StatusCode {
    let mut status = StatusCode::from_u16(shared.status.load(Ordering::SeqCst)).unwrap();
    if shared.away.load(Ordering::SeqCst) {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
    if !status.is_success() {
        *shared.refused.lock().unwrap() += 1;
        return status;
    }
    let key = headers
        .get("idempotency-key")
        .expect("every report carries an idempotency key")
        .to_str()
        .unwrap()
        .to_string();
    if !shared.keys.lock().unwrap().insert(key.clone()) {
        shared.repeats.fetch_add(1, Ordering::SeqCst);
        return status;
    }
    let session = Uuid::parse_str(body["sessionId"].as_str().expect("sessionId")).unwrap();
    let count = body["count"].as_u64().expect("count");
    assert!(count > 0, "a report of zero is never sent");
    shared.accepted.lock().unwrap().push((session, count, key));
    let delay = {
        let mut slow = shared.slow.lock().unwrap();
        match slow.as_mut() {
            Some((n, delay)) if *n > 0 => {
                *n -= 1;
                Some(*delay)
            }
            _ => None,
        }
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    status
}
