//! In-step viewers, written to by the fan-out itself.
//!
//! Waking one task per viewer per tick, only for it to copy the same frame into its
//! socket, cost more than the write. So a viewer that has caught up with its session
//! hands its socket to the session ([`Viewers`]): each frame is then written to it
//! straight from the fan-out with a non-blocking write, and its task sleeps until
//! the peer closes. A viewer whose socket cannot take a whole frame is handed back
//! to its task with the unwritten rest and a place in the session's signals right
//! after that frame ([`Handoff`]); the task writes at the viewer's pace, as every
//! viewer's did before, and rejoins once it has caught up. Exactly one of the two
//! writes to a socket at any time: the hand-over in either direction happens under
//! the session's outbox lock, which every frame is sent under.

use std::io;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use futures::task::AtomicWaker;
use tokio::net::TcpStream;
use tokio::sync::broadcast;

use crate::gzip;
use crate::metrics::GzipMeter;
use crate::session::Signal;

mod gzipped;

use gzipped::Gzipped;

/// An accepted connection's socket, which the fan-out writes to while its viewer is
/// in step. Every connection has one (`net::GuardedStream` reads and writes through
/// it), so that a viewer costs no allocation of its own.
pub struct Viewer {
    socket: TcpStream,
    /// Left by the fan-out when it gives the socket back; taken by the viewer's task.
    /// Boxed: it is rare, and this is kept for every idle connection.
    handoff: Mutex<Option<Box<Handoff>>>,
    /// The viewer's task, waiting for the hand-off. (Smaller than a `Notify`, and it
    /// is there for every idle viewer.)
    task: AtomicWaker,
}

/// What the viewer's task takes over when the fan-out gives its socket back.
pub struct Handoff {
    /// The part of the last frame the socket did not take; to be written first.
    pub rest: Bytes,
    /// The signals after that frame; `None` if nothing more will come (the frame
    /// was the last, or the socket failed).
    pub signals: Option<broadcast::Receiver<Signal>>,
    /// For a gzip stream: what it has carried, including the frame `rest` is of.
    pub gzip: Option<gzip::Sum>,
    /// A last frame still to be encoded and written (gzip streams end in the task,
    /// with their own trailer).
    pub last: Option<Bytes>,
    /// The sequence number of the first frame `signals` will name: the viewer has
    /// every frame before it.
    pub next: u64,
}

impl Viewer {
    pub fn new(socket: TcpStream) -> Arc<Self> {
        Arc::new(Self {
            socket,
            handoff: Mutex::new(None),
            task: AtomicWaker::new(),
        })
    }

    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Waits until the fan-out gives the socket back, and takes what it left.
    pub async fn handed_off(&self) -> Box<Handoff> {
        std::future::poll_fn(|cx| {
            self.task.register(cx.waker());
            match self.handoff.lock().unwrap().take() {
                Some(handoff) => Poll::Ready(handoff),
                None => Poll::Pending,
            }
        })
        .await
    }

    fn hand_off(&self, handoff: Handoff) {
        *self.handoff.lock().unwrap() = Some(Box::new(handoff));
        self.task.wake();
    }
}

/// How one write to an in-step viewer went.
enum Written {
    /// All of it: the viewer stays in step.
    All,
    /// The socket took only this many bytes (possibly none): the rest is the task's.
    Part(usize),
    /// The connection failed; its task ends the stream.
    Failed,
}

fn write(socket: &TcpStream, bytes: &[u8]) -> Written {
    match socket.try_write(bytes) {
        Ok(n) if n == bytes.len() => Written::All,
        Ok(n) => Written::Part(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Written::Part(0),
        Err(_) => Written::Failed,
    }
}

/// A session's in-step viewers. Lives in the outbox, so it is only touched under the
/// outbox lock.
pub struct Viewers {
    list: Vec<Arc<Viewer>>,
    /// Viewers sent the session's gzip stream (see `gzip`), while there are some.
    gzip: Option<Box<Gzipped>>,
    meter: GzipMeter,
}

impl Viewers {
    pub fn new(meter: GzipMeter) -> Self {
        Self {
            list: Vec::new(),
            gzip: None,
            meter,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len() + self.gzip.as_ref().map_or(0, |g| g.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a viewer; `gzip`: what its gzip stream has carried so far.
    pub fn join(&mut self, viewer: Arc<Viewer>, gzip: Option<gzip::Sum>) {
        let Some(sum) = gzip else {
            self.list.push(viewer);
            return;
        };
        let meter = &self.meter;
        self.gzip
            .get_or_insert_with(|| Box::new(Gzipped::new(meter.clone())))
            .join(viewer, sum);
    }

    /// Takes `viewer` out (its stream is closing); false if the fan-out had already
    /// given its socket back.
    pub fn leave(&mut self, viewer: &Arc<Viewer>) -> bool {
        if let Some(at) = self.list.iter().position(|v| Arc::ptr_eq(v, viewer)) {
            self.list.swap_remove(at);
            return true;
        }
        let Some(g) = self.gzip.as_mut() else {
            return false;
        };
        if !g.leave(viewer) {
            return false;
        }
        if g.len() == 0 {
            self.gzip = None;
        }
        true
    }

    /// The session went quiet: its compressor's memory is given back; the next frame
    /// starts afresh.
    pub fn release_compressor(&mut self) {
        if let Some(g) = self.gzip.as_mut() {
            g.release_compressor();
        }
    }

    /// Writes `bytes` to every in-step viewer. Those whose socket did not take it
    /// all are taken out and returned, to be given back to their tasks
    /// ([`hand_back`]). After a `last` frame every viewer is, to close its stream.
    #[must_use]
    pub fn send(&mut self, bytes: &Bytes, last: bool) -> Vec<Behind> {
        let mut behind: Vec<Behind> = Vec::new();
        self.list.retain(|viewer| {
            let rest = match write(&viewer.socket, bytes) {
                Written::All if !last => return true,
                Written::All => Some(Bytes::new()),
                Written::Part(n) => Some(bytes.slice(n..)),
                Written::Failed => None,
            };
            let continues = rest.is_some() && !last;
            behind.push(Behind::new(
                viewer,
                rest.unwrap_or_default(),
                continues,
                None,
            ));
            false
        });
        if let Some(g) = self.gzip.as_mut() {
            g.send(bytes, last, &mut behind);
            if g.len() == 0 {
                self.gzip = None;
            }
        }
        behind
    }

    /// Adds a viewer that is first to be sent `first` (what it lacks of what the
    /// others were sent), encoded for its stream; returns it instead if its socket
    /// did not take that whole.
    #[must_use]
    pub fn join_with(
        &mut self,
        viewer: Arc<Viewer>,
        mut gzip: Option<gzip::Sum>,
        first: &Bytes,
    ) -> Option<Behind> {
        let out = match gzip.as_mut() {
            None => first.clone(),
            Some(sum) => {
                sum.add(first);
                let stored = gzip::stored(first);
                self.meter.count(first.len(), stored.len(), 1);
                stored
            }
        };
        let rest = match write(&viewer.socket, &out) {
            Written::All => {
                self.join(viewer, gzip);
                return None;
            }
            Written::Part(n) => Some(out.slice(n..)),
            Written::Failed => None,
        };
        let continues = rest.is_some();
        Some(Behind::new(
            &viewer,
            rest.unwrap_or_default(),
            continues,
            gzip,
        ))
    }
}

/// Gives the viewers in `behind` back to their tasks; those that go on read the
/// signals sent from here on, `next` being the first frame's sequence number.
pub fn hand_back(behind: Vec<Behind>, tx: &broadcast::Sender<Signal>, next: u64) {
    for Behind {
        viewer,
        mut handoff,
        continues,
    } in behind
    {
        if continues {
            handoff.signals = Some(tx.subscribe());
        }
        handoff.next = next;
        viewer.hand_off(handoff);
    }
}

/// A viewer given back to its task, and whether it goes on reading the signals
/// (they are subscribed to once the frame was sent, to start right after it).
pub struct Behind {
    viewer: Arc<Viewer>,
    handoff: Handoff,
    continues: bool,
}

impl Behind {
    /// `rest`: what the socket did not take of a frame; `continues`: more will come
    /// (the socket did not fail, and the frame was not the last).
    fn new(viewer: &Arc<Viewer>, rest: Bytes, continues: bool, gzip: Option<gzip::Sum>) -> Self {
        Self {
            viewer: viewer.clone(),
            continues,
            handoff: Handoff {
                rest,
                signals: None,
                gzip,
                last: None,
                next: 0,
            },
        }
    }
}

/// An in-step viewer's socket and the browser's end of it, for the tests of what the
/// fan-out writes.
#[cfg(test)]
pub(crate) async fn connected(
    listener: &tokio::net::TcpListener,
) -> (Arc<Viewer>, tokio::net::TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (Viewer::new(server), client)
}
