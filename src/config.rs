//! Configuration: read once at start-up from the environment (and an optional `.env`),
//! validated, and then passed around as plain values. A bad value stops start-up with
//! a message that names the variable, so an operator never has to guess which one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::position;
use crate::topology::{self, Topology};

/// Why the configuration was refused. Every variant names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {var}={value:?}: expected {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("invalid {var}: {reason}")]
    Rejected { var: &'static str, reason: String },
}

/// Which browser origins may read the streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: the original service was open to every origin.
    Any,
    /// Exact origins such as `https://live.example.com`.
    List(Vec<String>),
}

/// Everything the server needs to start. Secrets are kept out of `Debug`.
#[derive(Clone)]
pub struct Config {
    /// Address to bind the HTTP listener to.
    pub bind: IpAddr,
    /// HTTP port; 0 lets the OS choose (tests).
    pub port: u16,
    /// Redis to subscribe to; `None` runs the in-process broker (single instance).
    pub redis: Option<Topology>,
    /// Where usage is POSTed; `None` counts usage without sending it.
    pub tenant_base_url: Option<String>,
    /// How often queues are captured and fanned out.
    pub tick: Duration,
    /// Bearer token guarding the publish API; `None` allows loopback clients only.
    pub publish_token: Option<String>,
    /// Origins allowed to read the streams from a browser.
    pub cors_origins: CorsOrigins,
    /// How long a session with no subscriber stays subscribed before it is freed.
    pub session_grace: Duration,
    /// Signals a viewer's task may fall behind before it reads what it missed from the
    /// replay buffer instead (merged). Every session allocates this many slots up front
    /// (56 bytes each), whether its viewers ever lag or not.
    pub subscriber_buffer: usize,
    /// A viewer whose socket accepts no bytes for this long is disconnected.
    pub slow_client_timeout: Duration,
    /// Idle time after which a heartbeat comment keeps proxies from closing streams.
    pub heartbeat: Duration,
    /// Reconnect delay advised to EventSource clients (`retry:`).
    pub client_retry: Duration,
    /// Largest chat payload accepted from Redis or the publish API.
    pub max_message_bytes: usize,
    /// Bytes one session may receive between two ticks; beyond, messages are dropped
    /// and the viewers get a `reset` there.
    pub inbox_bytes: usize,
    /// Batches kept per session for `Last-Event-ID` resume.
    pub replay_batches: usize,
    /// Bytes of framed batches kept per session for resume.
    pub replay_bytes: usize,
    /// How long connects to an ended session answer `204`.
    pub ended_ttl: Duration,
    /// Open SSE connections allowed on this instance.
    pub max_connections: usize,
    /// Open SSE connections allowed per session.
    pub max_connections_per_session: usize,
    /// Live sessions allowed on this instance.
    pub max_sessions: usize,
    /// How often accumulated usage is sent to the tenant.
    pub billing_flush: Duration,
    /// Timeout of one usage request to the tenant.
    pub billing_timeout: Duration,
    /// Upper bound on graceful shutdown.
    pub shutdown_timeout: Duration,
    /// Names this instance in the `X-Instance-Id` header and in logs.
    pub instance_id: String,
    /// Runtime worker threads; `None` uses one per core.
    pub worker_threads: Option<usize>,
    /// From accept to a complete first request head; slower clients are closed.
    pub header_timeout: Duration,
    /// Connections accepted whose first request head is not complete yet; beyond it
    /// the oldest such connection is closed to make room.
    pub max_pending_connections: usize,
    /// Open streams per client address (the forwarded one behind a trusted proxy).
    pub max_streams_per_client: usize,
    /// New sessions a client address may create per second (and in a burst, ten times it).
    pub new_sessions_per_client: u32,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` is believed; nobody else's is.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Messages per session kept in the shared history in Redis; 0 turns it off.
    pub history_messages: usize,
    /// Bytes per session kept in the shared history.
    pub history_bytes: usize,
    /// Longest wait of a session that starts being served here for the instances
    /// already serving it to say where it joins their stream.
    pub handover_wait: Duration,
    /// Longest time a stopping instance keeps serving its sessions' history after its
    /// viewers left, until other instances took them over.
    pub shutdown_handover: Duration,
    /// Also listen to every session and write the history of those served elsewhere,
    /// so that a killed instance's sessions are joined exactly.
    pub history_standby: bool,
    /// Streams are gzip-compressed, once per session, for viewers that accept it.
    pub compression: bool,
    /// Memory all sessions' compressors may hold at once (see `gzip::Budget`).
    pub gzip_memory: usize,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("port", &self.port)
            .field("redis", &self.redis.as_ref().map(Topology::describe))
            .field("tenant_base_url", &self.tenant_base_url)
            .field("tick", &self.tick)
            .field(
                "publish_token",
                &self.publish_token.as_ref().map(|_| "<set>"),
            )
            .field("cors_origins", &self.cors_origins)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads `.env` (optional: production sets real variables) and then the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        dotenvy::dotenv().ok();
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    /// Builds the configuration from any variable source, so tests need not touch the
    /// process environment (which parallel tests share).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&get);
        let config = Self {
            bind: env.parse("BIND_ADDR", "0.0.0.0".parse().unwrap(), "an IP address")?,
            port: env.parse("PORT", 8080, "a TCP port from 0 to 65535")?,
            redis: topology::from_env(&env)?,
            tenant_base_url: env.url("TENANT_BASE_URL")?,
            tick: env.millis("TICK_MS", 24, 1..=60_000)?,
            publish_token: env.string("PUBLISH_TOKEN"),
            cors_origins: cors_origins(&env)?,
            session_grace: env.millis("SESSION_GRACE_MS", 5_000, 0..=86_400_000)?,
            subscriber_buffer: env.count("SUBSCRIBER_BUFFER", 16, 1..=65_536)?,
            slow_client_timeout: env.millis("SLOW_CLIENT_TIMEOUT_MS", 10_000, 100..=3_600_000)?,
            heartbeat: env.millis("HEARTBEAT_MS", 15_000, 100..=3_600_000)?,
            client_retry: env.millis("CLIENT_RETRY_MS", 2_000, 0..=600_000)?,
            max_message_bytes: env.count("MAX_MESSAGE_BYTES", 16_384, 16..=16_777_216)?,
            inbox_bytes: env.count("INBOX_BYTES", 16 * 1024 * 1024, 16..=1 << 34)?,
            replay_batches: env.count("REPLAY_BATCHES", 512, 0..=1_000_000)?,
            replay_bytes: env.count("REPLAY_BYTES", 4 * 1024 * 1024, 0..=1 << 34)?,
            ended_ttl: env.millis("ENDED_SESSION_TTL_MS", 600_000, 0..=86_400_000)?,
            max_connections: env.count("MAX_CONNECTIONS", 50_000, 1..=10_000_000)?,
            max_connections_per_session: env.count(
                "MAX_CONNECTIONS_PER_SESSION",
                20_000,
                1..=10_000_000,
            )?,
            max_sessions: env.count("MAX_SESSIONS", 10_000, 1..=10_000_000)?,
            billing_flush: env.millis("BILLING_FLUSH_MS", 1_000, 10..=3_600_000)?,
            billing_timeout: env.millis("BILLING_TIMEOUT_MS", 5_000, 10..=600_000)?,
            shutdown_timeout: env.millis("SHUTDOWN_TIMEOUT_MS", 10_000, 0..=600_000)?,
            instance_id: env
                .string("INSTANCE_ID")
                .unwrap_or_else(default_instance_id),
            worker_threads: match env.string("WORKER_THREADS") {
                None => None,
                Some(_) => Some(env.count("WORKER_THREADS", 0, 1..=1024)?),
            },
            header_timeout: env.millis("HEADER_TIMEOUT_MS", 10_000, 100..=600_000)?,
            max_pending_connections: env.count("MAX_PENDING_CONNECTIONS", 1_024, 1..=1_000_000)?,
            max_streams_per_client: env.count("MAX_STREAMS_PER_CLIENT", 1_000, 1..=10_000_000)?,
            new_sessions_per_client: env.count("NEW_SESSIONS_PER_CLIENT", 20, 1..=1_000_000)?
                as u32,
            trusted_proxies: trusted_proxies(&env)?,
            history_messages: env.count("HISTORY_MESSAGES", position::WINDOW, 0..=1_000_000)?,
            history_bytes: env.count("HISTORY_BYTES", 1 << 20, 1_024..=1 << 30)?,
            handover_wait: env.millis("HANDOVER_WAIT_MS", 5_000, 0..=60_000)?,
            shutdown_handover: env.millis("SHUTDOWN_HANDOVER_MS", 10_000, 0..=600_000)?,
            history_standby: env.parse("HISTORY_STANDBY", false, "true or false")?,
            compression: env.parse("COMPRESSION", true, "true or false")?,
            gzip_memory: env.count("GZIP_MEMORY_BYTES", 256 << 20, 0..=1 << 40)?,
        };
        if (1..position::WINDOW).contains(&config.history_messages) {
            return Err(ConfigError::Rejected {
                var: "HISTORY_MESSAGES",
                reason: format!(
                    "{} is below {}: instances could name repeated messages differently \
                     (0 turns the history off)",
                    config.history_messages,
                    position::WINDOW
                ),
            });
        }
        if config.history_standby && config.redis.as_ref().is_some_and(Topology::sharded) {
            return Err(ConfigError::Rejected {
                var: "HISTORY_STANDBY",
                reason: "a standby listens to every session by pattern, which sharded pub/sub \
                         (REDIS_SHARDED_PUBSUB) does not have"
                    .into(),
            });
        }
        if config.inbox_bytes < config.max_message_bytes {
            return Err(ConfigError::Rejected {
                var: "INBOX_BYTES",
                reason: format!(
                    "{} is less than MAX_MESSAGE_BYTES ({}): no message would fit",
                    config.inbox_bytes, config.max_message_bytes
                ),
            });
        }
        Ok(config)
    }
}

/// `TRUSTED_PROXIES`: addresses or CIDR ranges, comma-separated; loopback by default
/// (a proxy on the same host), empty (`none`) to trust no one.
fn trusted_proxies(env: &Env<'_>) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let raw = env
        .string("TRUSTED_PROXIES")
        .unwrap_or_else(|| "127.0.0.0/8,::1".into());
    if raw.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| ConfigError::Invalid {
                    var: "TRUSTED_PROXIES",
                    value: s.to_string(),
                    expected: "IP addresses or CIDR ranges, comma-separated",
                })
        })
        .collect()
}

fn cors_origins(env: &Env<'_>) -> Result<CorsOrigins, ConfigError> {
    let Some(raw) = env.string("CORS_ALLOWED_ORIGINS") else {
        return Ok(CorsOrigins::Any);
    };
    if raw.trim() == "*" {
        return Ok(CorsOrigins::Any);
    }
    let origins: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let valid = |o: &String| {
        (o.starts_with("http://") || o.starts_with("https://"))
            && axum::http::HeaderValue::from_str(o).is_ok()
    };
    if origins.is_empty() || !origins.iter().all(valid) {
        return Err(ConfigError::Invalid {
            var: "CORS_ALLOWED_ORIGINS",
            value: raw,
            expected: "* or a comma-separated list of origins like https://example.com",
        });
    }
    Ok(CorsOrigins::List(origins))
}

fn default_instance_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "chat-sync".into())
}

/// A variable source with the parsing rules shared by every variable.
pub(crate) struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    /// An unset or blank variable is absent (a `.env` line `X=` means "use the default").
    pub(crate) fn string(&self, var: &str) -> Option<String> {
        (self.0)(var).filter(|v| !v.trim().is_empty())
    }

    pub(crate) fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        match self.string(var) {
            None => Ok(default),
            Some(value) => value.trim().parse().map_err(|_| ConfigError::Invalid {
                var,
                value,
                expected,
            }),
        }
    }

    fn count(
        &self,
        var: &'static str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let n = self.parse(var, default, "a whole number")?;
        if range.contains(&n) {
            Ok(n)
        } else {
            Err(ConfigError::Rejected {
                var,
                reason: format!("{n} is outside {}..={}", range.start(), range.end()),
            })
        }
    }

    fn millis(
        &self,
        var: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        let ms = self.parse(var, default, "a whole number of milliseconds")?;
        if range.contains(&ms) {
            Ok(Duration::from_millis(ms))
        } else {
            Err(ConfigError::Rejected {
                var,
                reason: format!("{ms} ms is outside {}..={} ms", range.start(), range.end()),
            })
        }
    }

    fn url(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        match self.string(var) {
            None => Ok(None),
            Some(v) if v.starts_with("http://") || v.starts_with("https://") => {
                Ok(Some(v.trim_end_matches('/').to_string()))
            }
            Some(value) => Err(ConfigError::Invalid {
                var,
                value,
                expected: "an http:// or https:// URL",
            }),
        }
    }
}

#[cfg(test)]
impl Config {
    /// From `(variable, value)` pairs, for unit tests.
    pub(crate) fn from_pairs(vars: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::from_lookup(|k| vars.get(k).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_pairs(vars)
    }

    #[test]
    fn defaults_run_without_any_service() {
        let c = config(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.tick, Duration::from_millis(24));
        assert!(c.redis.is_none());
        assert!(c.tenant_base_url.is_none());
        assert_eq!(c.cors_origins, CorsOrigins::Any);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("TICK_MS", "fast"),
            ("TICK_MS", "0"),
            ("PORT", "70000"),
            ("REDIS_PORT", "abc"),
            ("REDIS_URL", "http://nope"),
            ("TENANT_BASE_URL", "tenant.local"),
            ("CORS_ALLOWED_ORIGINS", "example.com"),
            ("HISTORY_MESSAGES", "10"),
            ("HANDOVER_WAIT_MS", "soon"),
            ("HISTORY_STANDBY", "yes"),
            ("COMPRESSION", "gzip"),
        ] {
            let err = config(&[(var, value), ("REDIS_IP", "127.0.0.1")])
                .err()
                .unwrap_or_else(|| panic!("{var}={value} was accepted"));
            assert!(err.to_string().contains(var), "{err} does not name {var}");
        }
    }

    #[test]
    fn original_redis_variables_are_understood() {
        let c = config(&[
            ("REDIS_IP", "10.0.0.5"),
            ("REDIS_PORT", "6380"),
            ("REDIS_PASSWORD", "s3cret"),
        ])
        .unwrap();
        let Some(Topology::Single(info)) = c.redis.clone() else {
            panic!("one server expected");
        };
        assert_eq!(info.addr().to_string(), "10.0.0.5:6380");
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
