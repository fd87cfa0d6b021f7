//! The in-process broker: lets `cargo run` work with no other service. One instance
//! only; publishes come from the HTTP publish API.

use std::collections::HashSet;
use std::sync::Mutex;

use bytes::Bytes;
use uuid::Uuid;

use super::{BrokerEvent, END_SUFFIX, Sink};

pub struct MemoryBroker {
    /// Sessions with live subscriptions; a publish to any other channel reaches no one,
    /// exactly as with Redis.
    subscribed: Mutex<HashSet<Uuid>>,
    sink: Sink,
}

impl MemoryBroker {
    pub fn new(sink: Sink) -> Self {
        Self {
            subscribed: Mutex::new(HashSet::new()),
            sink,
        }
    }

    pub fn subscribe(&self, session: Uuid) {
        self.subscribed.lock().unwrap().insert(session);
    }

    pub fn unsubscribe(&self, session: Uuid) {
        self.subscribed.lock().unwrap().remove(&session);
    }

    /// Delivers to the sink if the channel's session is subscribed, like Redis would.
    pub fn publish(&self, channel: &str, payload: Bytes) -> usize {
        let session = channel.strip_suffix(END_SUFFIX).unwrap_or(channel);
        let subscribed =
            Uuid::try_parse(session).is_ok_and(|id| self.subscribed.lock().unwrap().contains(&id));
        if !subscribed {
            return 0;
        }
        (self.sink)(BrokerEvent::Message {
            channel: channel.as_bytes(),
            payload,
        });
        1
    }
}
