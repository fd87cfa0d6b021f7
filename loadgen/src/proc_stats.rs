//! CPU time and resident memory of processes, read from /proc (Linux).

use std::time::Instant;

/// USER_HZ: the unit of /proc/<pid>/stat times; 100 on every Linux we run on.
const TICKS_PER_SEC: f64 = 100.0;

fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after ')'.
    (ticks(11) + ticks(12)) / TICKS_PER_SEC
}

#[derive(Clone, Copy)]
pub struct Cpu {
    seconds: f64,
    at: Instant,
}

impl Cpu {
    pub fn now(pids: &[u32]) -> Self {
        Self {
            seconds: pids.iter().map(|p| cpu_seconds(&p.to_string())).sum(),
            at: Instant::now(),
        }
    }

    /// CPU seconds the processes spent since `self`.
    pub fn elapsed(&self, pids: &[u32]) -> f64 {
        Self::now(pids).seconds - self.seconds
    }

    pub fn own() -> Self {
        Self {
            seconds: cpu_seconds("self"),
            at: Instant::now(),
        }
    }

    pub fn own_since(start: Self) -> f64 {
        let _ = start.at;
        cpu_seconds("self") - start.seconds
    }
}

/// Summed VmRSS of the processes, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_of(&p.to_string())).sum()
}

pub fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
