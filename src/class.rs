//! Delivery classes: viewers that asked to be sent less than every tick (`interval_ms`:
//! fewer, larger batches; `max_batch`: at most so many messages per event, the newest,
//! with a count of the rest). A phone on a weak network or a page in a background tab
//! cannot render 40 updates a second, and nobody reads 2,000 messages a second.
//!
//! Viewers of one session in one class share everything: the frames since the class's
//! last delivery are held (by reference; they are the replay buffer's), merged into
//! one event when the class is due, and that one event is written to every in-step
//! viewer of the class, as the every-tick viewers are written the tick's frame
//! (`viewer`). So 5,000 viewers at 250 ms cost one merge and 5,000 writes every 250 ms.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;

use crate::frame::{self, Kept};
use crate::gzip;
use crate::metrics::GzipMeter;
use crate::viewer::{Behind, Viewer, Viewers};

/// Longest `interval_ms` a viewer may ask for: beyond, a heartbeat would be due
/// before the batch.
pub const MAX_INTERVAL_MS: u64 = 10_000;
/// Most messages per event a viewer may ask for (`max_batch`).
pub const MAX_BATCH: usize = 1_000;
/// Most recent messages a joining viewer may ask for (`history`).
pub const MAX_HISTORY: usize = 500;
/// Classes a session serves at most: each holds frames, and with gzip viewers a
/// compressor. A connect that would add one more is refused (`503`); pages use a few
/// modes, which their viewers share.
pub const MAX_CLASSES: usize = 16;
/// Bytes of frames a class holds for its next delivery; beyond, it is delivered early,
/// so a slow class over a busy session holds a bounded amount.
const MAX_HELD_BYTES: usize = 256 * 1024;

/// How a viewer is sent the session's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// Ticks between two deliveries, at least 1.
    pub every: u32,
    /// The most messages in one event; the older ones are skipped (and counted).
    pub max_batch: Option<u32>,
}

impl Default for Class {
    fn default() -> Self {
        Self {
            every: 1,
            max_batch: None,
        }
    }
}

impl Class {
    /// Every frame, at every tick: the viewers the fan-out writes to directly.
    pub fn is_every_tick(&self) -> bool {
        *self == Self::default()
    }

    pub fn keep(&self) -> Option<usize> {
        self.max_batch.map(|n| n as usize)
    }
}

/// What a viewer asked for on the stream's URL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Asked {
    pub class: Class,
    /// Recent messages to send first on a fresh connect.
    pub history: usize,
}

/// A query parameter with a value out of its range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name} must be a whole number from {min} to {max}")]
pub struct BadParameter {
    pub name: &'static str,
    pub min: u64,
    pub max: u64,
}

/// Reads `interval_ms`, `max_batch` and `history` from a stream URL's query; other
/// parameters are left alone (pages add cache-busters). The interval is rounded up
/// to a whole number of ticks.
pub fn parse(query: Option<&str>, tick: Duration) -> Result<Asked, BadParameter> {
    let mut asked = Asked::default();
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "interval_ms" => {
                let ms = number("interval_ms", value, 0, MAX_INTERVAL_MS)?;
                let tick = tick.as_millis().max(1) as u64;
                asked.class.every = ms.div_ceil(tick).max(1) as u32;
            }
            "max_batch" => {
                asked.class.max_batch =
                    Some(number("max_batch", value, 1, MAX_BATCH as u64)? as u32);
            }
            "history" => asked.history = number("history", value, 0, MAX_HISTORY as u64)? as usize,
            _ => {}
        }
    }
    Ok(asked)
}

fn number(name: &'static str, value: &str, min: u64, max: u64) -> Result<u64, BadParameter> {
    let bad = BadParameter { name, min, max };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or(bad)
}

/// A session's viewers of the classes other than every tick. Lives in the outbox.
pub struct Classes {
    groups: Vec<Group>,
    meter: GzipMeter,
    /// Messages left out for viewers, each counted once per viewer.
    skipped: Counter,
    /// The latest tick delivered at.
    tick: u64,
}

/// One class's viewers of one session, and what they are to be sent next.
struct Group {
    class: Class,
    /// Frames since the last delivery, with their sequence numbers.
    held: Vec<(u64, Arc<Kept>)>,
    held_bytes: usize,
    /// The tick of the last delivery.
    sent_at: Option<u64>,
    viewers: Viewers,
    /// Viewers that joined while frames were held, which they had already been sent:
    /// they get only the frames after `after` at the next delivery, then join.
    joining: Vec<Joining>,
}

struct Joining {
    viewer: Arc<Viewer>,
    after: u64,
    gzip: Option<gzip::Sum>,
}

impl Group {
    fn is_due(&self, tick: u64) -> bool {
        !self.held.is_empty()
            && (self.held_bytes >= MAX_HELD_BYTES
                || self.held.iter().any(|(_, k)| k.is_notice())
                || self
                    .sent_at
                    .is_none_or(|at| tick >= at.saturating_add(u64::from(self.class.every))))
    }

    /// Sends what is held as one event (a notice stays its own) to the class, and to
    /// each joining viewer what it lacks of it.
    fn deliver(&mut self, tick: u64, behind: &mut Vec<Behind>, skipped: &Counter) {
        let keep = self.class.keep();
        let frames: Vec<Arc<Kept>> = self.held.iter().map(|(_, k)| k.clone()).collect();
        let merged = frame::merge(&frames, keep, true);
        skipped.inc_by((merged.skipped * self.viewers.len()) as u64);
        behind.extend(self.viewers.send(&merged.bytes, false));
        for Joining {
            viewer,
            after,
            gzip,
        } in self.joining.drain(..)
        {
            let lacks: Vec<Arc<Kept>> = self
                .held
                .iter()
                .filter(|(seq, _)| *seq > after)
                .map(|(_, k)| k.clone())
                .collect();
            if lacks.is_empty() {
                self.viewers.join(viewer, gzip);
                continue;
            }
            let first = frame::merge(&lacks, keep, true);
            skipped.inc_by(first.skipped as u64);
            behind.extend(self.viewers.join_with(viewer, gzip, &first.bytes));
        }
        self.held.clear();
        self.held_bytes = 0;
        self.sent_at = Some(tick);
    }

    fn len(&self) -> usize {
        self.viewers.len() + self.joining.len()
    }
}

impl Classes {
    pub fn new(meter: GzipMeter, skipped: Counter) -> Self {
        Self {
            groups: Vec::new(),
            meter,
            skipped,
            tick: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.groups.iter().map(Group::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether a viewer of `class` may be added: every-tick viewers and existing
    /// classes always; a new class while there are fewer than [`MAX_CLASSES`].
    pub fn admits(&self, class: Class) -> bool {
        class.is_every_tick()
            || self.groups.len() < MAX_CLASSES
            || self.groups.iter().any(|g| g.class == class)
    }

    /// Whether a class holds frames still to be delivered.
    pub fn holds(&self) -> bool {
        self.groups.iter().any(|g| !g.held.is_empty())
    }

    /// Adds a viewer of `class` that has been sent every frame up to `after` (the
    /// newest); `gzip`: what its gzip stream has carried so far.
    pub fn join(&mut self, class: Class, viewer: Arc<Viewer>, gzip: Option<gzip::Sum>, after: u64) {
        let at = match self.groups.iter().position(|g| g.class == class) {
            Some(at) => at,
            None => {
                self.groups.push(Group {
                    class,
                    held: Vec::new(),
                    held_bytes: 0,
                    sent_at: None,
                    viewers: Viewers::new(self.meter.clone()),
                    joining: Vec::new(),
                });
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[at];
        if group.held.is_empty() {
            group.viewers.join(viewer, gzip);
        } else {
            group.joining.push(Joining {
                viewer,
                after,
                gzip,
            });
        }
    }

    /// Takes `viewer` out; false if it was not here (it had been given back).
    pub fn leave(&mut self, viewer: &Arc<Viewer>) -> bool {
        let mut found = false;
        for group in &mut self.groups {
            if let Some(at) = group
                .joining
                .iter()
                .position(|j| Arc::ptr_eq(&j.viewer, viewer))
            {
                group.joining.swap_remove(at);
                found = true;
            } else {
                found = group.viewers.leave(viewer);
            }
            if found {
                break;
            }
        }
        self.groups.retain(|g| g.len() > 0);
        found
    }

    /// Holds the frame `seq` for each class's next delivery.
    pub fn hold(&mut self, seq: u64, kept: &Arc<Kept>) {
        for group in &mut self.groups {
            group.held_bytes += kept.bytes.len();
            group.held.push((seq, kept.clone()));
        }
    }

    /// Delivers to each class that is due at `tick`.
    #[must_use]
    pub fn deliver(&mut self, tick: u64) -> Vec<Behind> {
        self.tick = tick;
        let mut behind = Vec::new();
        for group in &mut self.groups {
            if group.is_due(tick) {
                group.deliver(tick, &mut behind, &self.skipped);
            }
        }
        behind
    }

    /// Delivers what every class holds, due or not.
    #[must_use]
    pub fn flush(&mut self) -> Vec<Behind> {
        let mut behind = Vec::new();
        for group in &mut self.groups {
            if !group.held.is_empty() {
                group.deliver(self.tick, &mut behind, &self.skipped);
            }
        }
        behind
    }

    /// Writes `bytes` (a heartbeat, or with `last` the stream's last frame) to every
    /// class; what they held must have been delivered ([`Classes::flush`]).
    #[must_use]
    pub fn send(&mut self, bytes: &Bytes, last: bool) -> Vec<Behind> {
        let mut behind = Vec::new();
        for group in &mut self.groups {
            behind.extend(group.viewers.send(bytes, last));
        }
        self.groups.retain(|g| g.len() > 0);
        behind
    }

    pub fn release_compressors(&mut self) {
        for group in &mut self.groups {
            group.viewers.release_compressor();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::position::Position;
    use crate::viewer::connected;

    /// Message `n` framed alone, as the replay buffer keeps it.
    fn kept(n: u64) -> Arc<Kept> {
        let framed = frame::batch(Position::after(n), &[Bytes::from(format!("m{n}"))]);
        Arc::new(Kept {
            bytes: framed.bytes,
            fingerprints: vec![n].into(),
            offsets: framed.offsets.into(),
        })
    }

    /// What a viewer read, event by event: a batch's messages, or `skipped N`.
    async fn events(mut client: tokio::net::TcpStream) -> Vec<String> {
        let mut text = String::new();
        client.read_to_string(&mut text).await.unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| match e.split_once("data: ") {
                Some((head, data)) if head.contains("skipped") => format!("skipped {data}"),
                Some((_, data)) => data.to_string(),
                None => e.to_string(),
            })
            .collect()
    }

    /// One frame a tick: a class of every 3 ticks is sent the first at once, then what
    /// it held merged, every third tick; with `max_batch` the newest of it, after how
    /// many were left out.
    #[tokio::test]
    async fn a_class_is_sent_what_it_held_at_most_every_so_many_ticks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (paced, paced_client) = connected(&listener).await;
        let (capped, capped_client) = connected(&listener).await;
        let mut classes = Classes::new(GzipMeter::default(), Counter::default());
        let every = |max_batch| Class {
            every: 3,
            max_batch,
        };
        classes.join(every(None), paced, None, 0);
        classes.join(every(Some(2)), capped, None, 0);
        for tick in 1..=10 {
            classes.hold(tick, &kept(tick));
            assert!(classes.deliver(tick).is_empty(), "the sockets took it all");
        }
        drop(classes);
        assert_eq!(
            events(paced_client).await,
            [
                r#"["m1"]"#,
                r#"["m2","m3","m4"]"#,
                r#"["m5","m6","m7"]"#,
                r#"["m8","m9","m10"]"#
            ]
        );
        let skip = r#"skipped {"skipped":1}"#;
        assert_eq!(
            events(capped_client).await,
            [
                r#"["m1"]"#,
                skip,
                r#"["m3","m4"]"#,
                skip,
                r#"["m6","m7"]"#,
                skip,
                r#"["m9","m10"]"#
            ]
        );
    }

    const TICK: Duration = Duration::from_millis(24);

    #[test]
    fn parameters_parse_within_their_ranges_and_round_up_to_ticks() {
        let asked = parse(Some("interval_ms=250&max_batch=20&history=50&t=1"), TICK).unwrap();
        assert_eq!(asked.class.every, 11, "250 ms is 10.4 ticks of 24 ms");
        assert_eq!(asked.class.max_batch, Some(20));
        assert_eq!(asked.history, 50);
        assert_eq!(parse(None, TICK).unwrap(), Asked::default());
        assert!(
            parse(Some("interval_ms=0"), TICK)
                .unwrap()
                .class
                .is_every_tick()
        );
        assert!(
            parse(Some("interval_ms=24"), TICK)
                .unwrap()
                .class
                .is_every_tick()
        );
        assert_eq!(parse(Some("interval_ms=25"), TICK).unwrap().class.every, 2);
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (query, name) in [
            ("interval_ms=-1", "interval_ms"),
            ("interval_ms=10001", "interval_ms"),
            ("interval_ms=", "interval_ms"),
            ("interval_ms=1.5", "interval_ms"),
            ("max_batch=0", "max_batch"),
            ("max_batch=99999999999999999999999", "max_batch"),
            ("history=x", "history"),
            ("history=501", "history"),
            ("history", "history"),
        ] {
            assert_eq!(parse(Some(query), TICK).unwrap_err().name, name, "{query}");
        }
    }
}
