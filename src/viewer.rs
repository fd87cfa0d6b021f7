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

use crate::session::Signal;

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
#[derive(Default)]
pub struct Viewers {
    list: Vec<Arc<Viewer>>,
}

impl Viewers {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn join(&mut self, viewer: Arc<Viewer>) {
        self.list.push(viewer);
    }

    /// Takes `viewer` out (its stream is closing); false if the fan-out had already
    /// given its socket back.
    pub fn leave(&mut self, viewer: &Arc<Viewer>) -> bool {
        match self.list.iter().position(|v| Arc::ptr_eq(v, viewer)) {
            Some(at) => {
                self.list.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// Writes `bytes` (the frame `signal` stands for) to every in-step viewer, then
    /// sends `signal` on `tx` for the viewers reading at their own pace. A viewer
    /// whose socket did not take it all is given back to its task, reading the
    /// signals from the next one on. After a `last` frame every viewer is given back,
    /// to close its stream.
    pub fn send(
        &mut self,
        tx: &broadcast::Sender<Signal>,
        signal: Signal,
        bytes: &Bytes,
        last: bool,
    ) {
        let mut behind: Vec<(Arc<Viewer>, Option<Bytes>)> = Vec::new();
        self.list.retain(|viewer| {
            let rest = match write(&viewer.socket, bytes) {
                Written::All if !last => return true,
                Written::All => Some(Bytes::new()),
                Written::Part(n) => Some(bytes.slice(n..)),
                Written::Failed => None,
            };
            behind.push((viewer.clone(), rest));
            false
        });
        let _ = tx.send(signal);
        for (viewer, rest) in behind {
            let signals = match &rest {
                Some(_) if !last => Some(tx.subscribe()),
                _ => None,
            };
            viewer.hand_off(Handoff {
                rest: rest.unwrap_or_default(),
                signals,
            });
        }
    }
}
