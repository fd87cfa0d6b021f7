//! The Redis variables: which of the three topologies, and where its servers are.

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use super::{ClusterSettings, SentinelSettings, Topology};
use crate::config::{ConfigError, Env};

/// `REDIS_SENTINELS` or `REDIS_CLUSTER_NODES` name a topology with no single point of
/// failure; otherwise `REDIS_URL` wins over the original's
/// `REDIS_IP`/`REDIS_PORT`/`REDIS_PASSWORD`; nothing means the in-process broker.
pub(crate) fn from_env(env: &Env<'_>) -> Result<Option<Topology>, ConfigError> {
    let port: u16 = env.parse("REDIS_PORT", 6379, "a TCP port from 1 to 65535")?;
    if port == 0 {
        return Err(ConfigError::Invalid {
            var: "REDIS_PORT",
            value: "0".into(),
            expected: "a TCP port from 1 to 65535",
        });
    }
    let mut node = RedisConnectionInfo::default();
    if let Some(user) = env.string("REDIS_USERNAME") {
        node = node.set_username(user);
    }
    if let Some(password) = env.string("REDIS_PASSWORD") {
        node = node.set_password(password);
    }
    let sharded = env.parse("REDIS_SHARDED_PUBSUB", false, "true or false")?;
    let sentinels = env.string("REDIS_SENTINELS");
    let cluster = env.string("REDIS_CLUSTER_NODES");
    if sentinels.is_some() && cluster.is_some() {
        return Err(ConfigError::Rejected {
            var: "REDIS_SENTINELS",
            reason: "set either REDIS_SENTINELS or REDIS_CLUSTER_NODES, not both".into(),
        });
    }
    if sharded && cluster.is_none() {
        return Err(ConfigError::Rejected {
            var: "REDIS_SHARDED_PUBSUB",
            reason: "sharded pub/sub needs a Redis Cluster (REDIS_CLUSTER_NODES)".into(),
        });
    }
    if let Some(list) = sentinels {
        let Some(master) = env.string("REDIS_SENTINEL_MASTER") else {
            return Err(ConfigError::Rejected {
                var: "REDIS_SENTINEL_MASTER",
                reason: "REDIS_SENTINELS needs the name of the master the sentinels watch".into(),
            });
        };
        let mut sentinel = RedisConnectionInfo::default();
        if let Some(password) = env.string("REDIS_SENTINEL_PASSWORD") {
            sentinel = sentinel.set_password(password);
        }
        let sentinels = addresses("REDIS_SENTINELS", &list)?
            .into_iter()
            .map(|info| info.set_redis_settings(sentinel.clone()))
            .collect();
        return Ok(Some(Topology::Sentinel(SentinelSettings {
            sentinels,
            master: master.trim().to_string(),
            node,
        })));
    }
    if let Some(list) = cluster {
        let nodes = addresses("REDIS_CLUSTER_NODES", &list)?
            .into_iter()
            .map(|info| info.set_redis_settings(node.clone()))
            .collect();
        return Ok(Some(Topology::Cluster(ClusterSettings { nodes, sharded })));
    }
    if let Some(url) = env.string("REDIS_URL") {
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| ConfigError::Rejected {
                var: "REDIS_URL",
                reason: format!("not a redis:// URL ({})", e.category()),
            })?;
        return Ok(Some(Topology::Single(info)));
    }
    let Some(host) = env.string("REDIS_IP") else {
        return Ok(None);
    };
    let info = ConnectionAddr::Tcp(host, port)
        .into_connection_info()
        .map_err(|e| ConfigError::Rejected {
            var: "REDIS_IP",
            reason: e.to_string(),
        })?
        .set_redis_settings(node);
    Ok(Some(Topology::Single(info)))
}

/// `host:port,host:port,...`
fn addresses(var: &'static str, list: &str) -> Result<Vec<ConnectionInfo>, ConfigError> {
    let invalid = |value: &str| ConfigError::Invalid {
        var,
        value: value.to_string(),
        expected: "a comma-separated list of host:port",
    };
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|address| {
            let (host, port) = address.rsplit_once(':').ok_or_else(|| invalid(address))?;
            let port: u16 = port.parse().map_err(|_| invalid(address))?;
            if host.is_empty() || port == 0 {
                return Err(invalid(address));
            }
            let host = host.trim_start_matches('[').trim_end_matches(']');
            ConnectionAddr::Tcp(host.to_string(), port)
                .into_connection_info()
                .map_err(|_| invalid(address))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(invalid(list))
            } else {
                Ok(v)
            }
        })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use crate::topology::Topology;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_pairs(vars)
    }

    #[test]
    fn sentinel_and_cluster_variables_are_understood() {
        let c = config(&[
            (
                "REDIS_SENTINELS",
                "10.0.0.1:26379, 10.0.0.2:26379,10.0.0.3:26379",
            ),
            ("REDIS_SENTINEL_MASTER", "mymaster"),
            ("REDIS_PASSWORD", "node-secret"),
            ("REDIS_SENTINEL_PASSWORD", "sentinel-secret"),
        ])
        .unwrap();
        let Some(Topology::Sentinel(s)) = &c.redis else {
            panic!("Sentinel expected");
        };
        assert_eq!(s.sentinels.len(), 3);
        assert_eq!(s.master, "mymaster");
        assert_eq!(s.node.password(), Some("node-secret"));
        assert_eq!(
            s.sentinels[1].redis_settings().password(),
            Some("sentinel-secret")
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");

        let c = config(&[
            ("REDIS_CLUSTER_NODES", "n1:7000,n2:7001"),
            ("REDIS_SHARDED_PUBSUB", "true"),
        ])
        .unwrap();
        let Some(Topology::Cluster(cluster)) = &c.redis else {
            panic!("Cluster expected");
        };
        assert_eq!(cluster.nodes.len(), 2);
        assert!(cluster.sharded);
        assert!(c.redis.as_ref().unwrap().sharded());
    }

    #[test]
    fn bad_topologies_name_their_variable() {
        for (vars, named) in [
            (
                &[("REDIS_SENTINELS", "10.0.0.1:26379")][..],
                "REDIS_SENTINEL_MASTER",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "10.0.0.1"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                ][..],
                "REDIS_SENTINELS",
            ),
            (
                &[("REDIS_CLUSTER_NODES", "n1:0")][..],
                "REDIS_CLUSTER_NODES",
            ),
            (&[("REDIS_CLUSTER_NODES", " , ")][..], "REDIS_CLUSTER_NODES"),
            (
                &[
                    ("REDIS_SENTINELS", "s:1"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_CLUSTER_NODES", "n:1"),
                ][..],
                "REDIS_SENTINELS",
            ),
            (
                &[("REDIS_SHARDED_PUBSUB", "true"), ("REDIS_URL", "redis://r")][..],
                "REDIS_SHARDED_PUBSUB",
            ),
            (
                &[
                    ("REDIS_CLUSTER_NODES", "n:1"),
                    ("REDIS_SHARDED_PUBSUB", "yes"),
                ][..],
                "REDIS_SHARDED_PUBSUB",
            ),
            (
                &[
                    ("REDIS_CLUSTER_NODES", "n:1"),
                    ("REDIS_SHARDED_PUBSUB", "true"),
                    ("HISTORY_STANDBY", "true"),
                ][..],
                "HISTORY_STANDBY",
            ),
        ] {
            let err = config(vars)
                .err()
                .unwrap_or_else(|| panic!("{vars:?} was accepted"));
            assert!(
                err.to_string().contains(named),
                "{err} does not name {named}"
            );
        }
    }
}
