//! Clients and what each may hold. A client is the TCP peer's address, or, when the
//! peer is a configured trusted proxy, the address that proxy says it forwarded for
//! (`X-Forwarded-For`, else `Forwarded`). A header from anyone else is ignored, so a
//! client cannot pick the address it is counted under. Per client: open streams are
//! capped, and creating sessions (a subscription each) is rate-limited, so that one
//! address can neither take every slot nor fill the session table by churn.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::http::HeaderMap;
use dashmap::DashMap;
use ipnet::IpNet;

/// Per-client limits and the bookkeeping behind them.
pub struct ClientLimits {
    streams: DashMap<IpAddr, usize>,
    /// Token buckets for session creation: (tokens, last refill).
    budgets: DashMap<IpAddr, (f64, Instant)>,
    max_streams: usize,
    /// New sessions per second; the burst is ten times this.
    rate: f64,
}

impl ClientLimits {
    pub fn new(max_streams: usize, new_sessions_per_sec: u32) -> Self {
        Self {
            streams: DashMap::new(),
            budgets: DashMap::new(),
            max_streams,
            rate: f64::from(new_sessions_per_sec),
        }
    }

    fn burst(&self) -> f64 {
        self.rate * 10.0
    }

    /// Counts a stream in for `client`, unless it has its share already.
    pub fn open_stream(&self, client: IpAddr) -> bool {
        let mut open = self.streams.entry(client).or_insert(0);
        if *open >= self.max_streams {
            return false;
        }
        *open += 1;
        true
    }

    pub fn close_stream(&self, client: IpAddr) {
        self.streams.remove_if_mut(&client, |_, open| {
            *open = open.saturating_sub(1);
            *open == 0
        });
    }

    /// Spends one of `client`'s session creations, if it has one left.
    pub fn create_session(&self, client: IpAddr, now: Instant) -> bool {
        let burst = self.burst();
        let mut budget = self.budgets.entry(client).or_insert((burst, now));
        let (tokens, last) = *budget;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(burst);
        if tokens < 1.0 {
            *budget = (tokens, now);
            return false;
        }
        *budget = (tokens - 1.0, now);
        true
    }

    /// Forgets clients whose budget is full again: the table holds only clients that
    /// created sessions recently.
    pub fn prune(&self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst());
        self.budgets.retain(|_, (tokens, last)| {
            *tokens + now.duration_since(*last).as_secs_f64() * rate < burst
        });
    }
}

/// The client address behind `peer`.
pub fn address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = forwarded_for(headers);
    // The nearest hop that is not one of our proxies is the client; if every hop is
    // ours, the farthest one is.
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// The addresses a request passed through, farthest first.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let joined = |name: &str| -> Option<String> {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    if let Some(xff) = joined("x-forwarded-for") {
        return xff.split(',').filter_map(parse_hop).collect();
    }
    let Some(forwarded) = joined("forwarded") else {
        return Vec::new();
    };
    forwarded
        .split(',')
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                key.eq_ignore_ascii_case("for").then(|| parse_hop(value))?
            })
        })
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:80`, `"[2001:db8::1]:4711"`, `2001:db8::1`.
fn parse_hop(raw: &str) -> Option<IpAddr> {
    let raw = raw.trim().trim_matches('"');
    raw.parse::<IpAddr>()
        .ok()
        .or_else(|| raw.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            raw.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|ip| ip.parse().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn streams_are_capped_per_client() {
        let limits = ClientLimits::new(2, 1);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        assert!(limits.open_stream(a) && limits.open_stream(a));
        assert!(!limits.open_stream(a), "a's share is taken");
        assert!(limits.open_stream(b), "b is not affected");
        limits.close_stream(a);
        assert!(limits.open_stream(a));
        limits.close_stream(b);
        assert!(
            !limits.streams.contains_key(&b),
            "nothing kept for idle clients"
        );
    }

    #[test]
    fn session_creation_is_a_token_bucket_per_client() {
        let limits = ClientLimits::new(10, 2);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let t = Instant::now();
        assert!(
            (0..20).all(|_| limits.create_session(a, t)),
            "a burst of 10 x rate"
        );
        assert!(!limits.create_session(a, t));
        assert!(limits.create_session(b, t));
        let later = t + std::time::Duration::from_millis(500);
        assert!(limits.create_session(a, later), "refilled at the rate");
        assert!(!limits.create_session(a, later));
        limits.prune(t + std::time::Duration::from_secs(60));
        assert!(limits.budgets.is_empty());
    }

    #[test]
    fn headers_from_untrusted_peers_are_ignored() {
        let h = headers(&[("x-forwarded-for", "198.51.100.7")]);
        assert_eq!(address(ip("203.0.113.9"), &h, &[]), ip("203.0.113.9"));
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        assert_eq!(address(ip("203.0.113.9"), &h, &trusted), ip("203.0.113.9"));
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_spoofed_hops_do_not_count() {
        let trusted = [
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let via_nginx = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(
            address(ip("127.0.0.1"), &via_nginx, &trusted),
            ip("203.0.113.9")
        );
        // The client sent its own X-Forwarded-For; nginx appended the real address.
        let spoofed = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.1.1.1")]);
        assert_eq!(
            address(ip("127.0.0.1"), &spoofed, &trusted),
            ip("203.0.113.9")
        );
        let forwarded = headers(&[("forwarded", r#"for="[2001:db8::1]:4711";proto=https"#)]);
        assert_eq!(
            address(ip("10.2.2.2"), &forwarded, &trusted),
            ip("2001:db8::1")
        );
        let none = headers(&[]);
        assert_eq!(address(ip("10.2.2.2"), &none, &trusted), ip("10.2.2.2"));
        let garbage = headers(&[("x-forwarded-for", "not an address")]);
        assert_eq!(address(ip("10.2.2.2"), &garbage, &trusted), ip("10.2.2.2"));
    }
}
