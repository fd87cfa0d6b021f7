//! The real binary in its own process, for what only a process shows (signals, exit).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;

pub struct ServerProcess {
    pub base: String,
    child: Child,
}

impl ServerProcess {
    pub async fn spawn(vars: &[(&str, &str)]) -> Self {
        Self::spawn_with_file_limit(None, vars).await
    }

    /// On `port`, as a restarted instance behind a proxy that knows its address. The
    /// port may still be held by the instance being replaced: tried until it is free.
    pub async fn spawn_on(port: u16, vars: &[(&str, &str)]) -> Self {
        Self::spawn_at(|| port, None, vars).await
    }

    /// With its file descriptor limit (soft and hard) set to `nofile`, through
    /// util-linux's `prlimit`, which execs the server in place (same pid).
    pub async fn spawn_with_file_limit(nofile: Option<u64>, vars: &[(&str, &str)]) -> Self {
        Self::spawn_at(free_port, nofile, vars).await
    }

    async fn spawn_at(port: impl Fn() -> u16, nofile: Option<u64>, vars: &[(&str, &str)]) -> Self {
        for _ in 0..40 {
            let port = port();
            let binary = env!("CARGO_BIN_EXE_chat-sync");
            let mut command = match nofile {
                None => Command::new(binary),
                Some(n) => {
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--nofile={n}:{n}")).arg("--").arg(binary);
                    c
                }
            };
            command
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("BIND_ADDR", "127.0.0.1")
                .env("PORT", port.to_string())
                .current_dir(std::env::temp_dir());
            // `TEST_SERVER_LOGS=info,redis=warn cargo test ... -- --nocapture` shows the
            // servers' logs with that filter, for a failing test.
            match std::env::var("TEST_SERVER_LOGS") {
                Ok(filter) => command.env("RUST_LOG", filter).stdout(Stdio::inherit()),
                Err(_) => command.env("RUST_LOG", "warn").stdout(Stdio::null()),
            };
            for (k, v) in vars {
                command.env(k, v);
            }
            let mut child = command.spawn().expect("start chat-sync");
            let base = format!("http://127.0.0.1:{port}");
            let http = super::http_client();
            // Up to 30 s: a debug build starting on a busy machine.
            for _ in 0..1200 {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                let ready = http.get(format!("{base}/readyz")).send().await;
                if ready.is_ok_and(|r| r.status() == 200) {
                    return Self { base, child };
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("chat-sync did not start");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// One sample of `/metrics` (0 for a series not there yet).
    pub async fn metric(&self, series: &str) -> f64 {
        super::metric_at(&self.base, series).await
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.base.trim_start_matches("http://").parse().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as `docker stop` does.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits for the process to exit (panics after [`super::WAIT`]); its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let exited = async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status.code();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(super::WAIT, exited)
            .await
            .expect("chat-sync still running after the wait")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
