//! The real nginx in front of real instances, running the project's
//! `deploy/nginx.conf` with only the upstream addresses and the listen port
//! substituted (and, for the tests that prove a check can fail, a variant of it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

use super::free_port;

/// The deploy configuration as shipped.
pub fn deploy_config() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
        .expect("deploy/nginx.conf")
}

/// nginx in the foreground, in its own prefix directory; stopped when dropped.
pub struct Nginx {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    /// nginx with `deploy/nginx.conf` in front of `upstreams` (`host:port` each).
    pub fn start(upstreams: &[String]) -> Self {
        Self::start_with(&deploy_config(), upstreams)
    }

    /// nginx with `conf` (a variant of the deploy file) in front of `upstreams`.
    pub fn start_with(conf: &str, upstreams: &[String]) -> Self {
        for _ in 0..10 {
            let port = free_port();
            let mut text = conf.replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
            for (i, upstream) in upstreams.iter().enumerate() {
                let name = format!("chat-sync-{}:8080", i + 1);
                assert!(text.contains(&name), "{name} in the nginx config");
                text = text.replace(&name, upstream);
            }
            let dir = std::env::temp_dir().join(format!("chat-sync-nginx-{}", Uuid::new_v4()));
            std::fs::create_dir_all(dir.join("logs")).unwrap();
            let path = dir.join("nginx.conf");
            std::fs::write(&path, text).unwrap();
            let globals = format!(
                "daemon off; pid {0}/nginx.pid; error_log {0}/logs/error.log warn;",
                dir.display()
            );
            let mut child = Command::new(nginx_binary())
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&path)
                .arg("-g")
                .arg(globals)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("nginx must be installed (scripts/test.sh installs it)");
            // Up to a minute: a busy machine may start it slowly; a taken port makes
            // it exit at once, and then another port is tried.
            for _ in 0..3000 {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { port, child, dir };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("nginx did not start");
    }

    /// The last lines of nginx's error log but "no live upstreams", for a failing test
    /// to show.
    pub fn error_log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default();
        let all: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("no live upstreams"))
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers before it exits (a SIGKILL would
    /// leave the workers running, holding the port).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..500 {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> String {
    [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .iter()
    .find(|p| std::path::Path::new(p).exists())
    .map(|p| p.to_string())
    .unwrap_or_else(|| "nginx".into())
}
