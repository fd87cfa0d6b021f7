//! The registry's limits, taken from the configuration once.

use std::time::Duration;

use crate::config::Config;

/// The registry's own limits, taken from the configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_session: usize,
    pub max_sessions: usize,
    pub subscriber_buffer: usize,
    pub replay_batches: usize,
    pub replay_bytes: usize,
    pub session_grace: Duration,
    pub ended_ttl: Duration,
    pub client_retry: Duration,
    pub max_streams_per_client: usize,
    pub new_sessions_per_client: u32,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Self {
            max_connections: c.max_connections,
            max_connections_per_session: c.max_connections_per_session,
            max_sessions: c.max_sessions,
            subscriber_buffer: c.subscriber_buffer,
            replay_batches: c.replay_batches,
            replay_bytes: c.replay_bytes,
            session_grace: c.session_grace,
            ended_ttl: c.ended_ttl,
            client_retry: c.client_retry,
            max_streams_per_client: c.max_streams_per_client,
            new_sessions_per_client: c.new_sessions_per_client,
        }
    }
}
