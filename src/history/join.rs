//! Joining a session that this instance starts serving to its shared history: ask the
//! instances already serving it where our subscription began (a join request on the
//! control channel falls at the same place in every instance's stream), then take the
//! history up to there and our own messages after it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use super::History;
use super::store::{Cursor, Entry, Snapshot};
use crate::broker::{Broker, STANDBY_CHANNEL, chat_channel};
use crate::frame;
use crate::position::Position;
use crate::session::{Outbox, Session};

/// How often a joining instance looks for the answer.
const POLL: Duration = Duration::from_millis(10);
/// Most messages per frame when the history is loaded into the replay buffer.
const FRAME_MESSAGES: usize = 64;

/// What a joining instance puts before its own messages.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    pub prefix: Vec<Entry>,
    /// Something may be missing between the prefix and our first message.
    pub gap: bool,
    pub how: &'static str,
}

impl History {
    /// Joins `session`, just subscribed here, to the shared history before anything
    /// of it is captured: loads the history into its replay buffer and says where this
    /// instance's writes continue it. Without a history, there is nothing to join.
    pub async fn join(&self, session: &Session, broker: &Broker) {
        let Some(store) = &self.store else { return };
        let ask = Uuid::new_v4().as_u64_pair().0;
        let request = Bytes::from(format!("{} {ask:016x}", session.id));
        let asked = broker
            .publish(broker.join_channel(session.id), request)
            .await
            .is_ok();
        let deadline = Instant::now() + self.handover_wait;
        let listeners = [chat_channel(session.id), STANDBY_CHANNEL.into()];
        let own_standby = usize::from(self.is_standby());
        while asked && Instant::now() < deadline {
            // Waiting is pointless when no other instance is subscribed to the session
            // to answer (neither serving it nor as a history standby). An empty
            // history is no reason to stop: an instance serving the session may not
            // have written its last tick.
            let alone = matches!(
                broker.subscriber_counts(&listeners).await.as_deref(),
                Ok([serving, standbys]) if *serving <= 1 && *standbys <= own_standby
            );
            if alone {
                break;
            }
            if let Ok(true) = store.answered(session.id, ask).await
                && own_ask(session, ask).is_some()
            {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let plan = match store.read(session.id, ask).await {
            Ok(snapshot) => {
                let inbox = session.inbox.lock().unwrap();
                plan(&snapshot, &inbox.messages, own_ask_in(&inbox, ask))
            }
            Err(e) => {
                tracing::warn!(session = %session.id, error = %e, "cannot read the history");
                Plan {
                    prefix: Vec::new(),
                    gap: true,
                    how: "unreadable",
                }
            }
        };
        self.metrics.history_join(plan.how);
        tracing::debug!(session = %session.id, how = plan.how, entries = plan.prefix.len(), "joined");
        let cursor = install(&mut session.outbox.lock().unwrap(), plan);
        self.start(session.id, cursor);
    }
}

fn own_ask(session: &Session, ask: u64) -> Option<usize> {
    own_ask_in(&session.inbox.lock().unwrap(), ask)
}

/// How many of our messages came before our own join request, if it came back and
/// nothing was lost before it.
fn own_ask_in(inbox: &crate::session::Inbox, ask: u64) -> Option<usize> {
    let (at, _) = inbox.asks.iter().find(|(_, id)| *id == ask)?;
    (!inbox.gaps.iter().any(|g| g <= at)).then_some(*at)
}

/// Decides the prefix: the history up to where the request fell, minus our own
/// messages before it (checked by payload); without an answer, the history up to where
/// our first messages overlap it, or all of it and a gap.
pub(super) fn plan(snapshot: &Snapshot, ours: &[Bytes], own_ask: Option<usize>) -> Plan {
    let entries = &snapshot.entries;
    if entries.is_empty() {
        return Plan {
            prefix: Vec::new(),
            gap: false,
            how: "empty",
        };
    }
    let same = |from: usize, n: usize| {
        entries[from..from + n]
            .iter()
            .zip(ours)
            .all(|(e, p)| matches!(e, Entry::Message(_, q) if q == p))
    };
    if let (Some(answer), Some(k)) = (snapshot.answer, own_ask) {
        let cut = answer.checked_sub(snapshot.base).map(|c| c as usize);
        if let Some(cut) = cut.filter(|&c| c >= k && c <= entries.len())
            && same(cut - k, k)
        {
            return Plan {
                prefix: entries[..cut - k].to_vec(),
                gap: false,
                how: "answered",
            };
        }
    }
    for n in (1..=entries.len().min(ours.len())).rev() {
        if same(entries.len() - n, n) {
            return Plan {
                prefix: entries[..entries.len() - n].to_vec(),
                gap: false,
                how: "overlap",
            };
        }
    }
    Plan {
        prefix: entries.clone(),
        gap: !matches!(entries.last(), Some(Entry::Gap)),
        how: "unanswered",
    }
}

/// Loads the prefix into the replay buffer (for viewers resuming from it) and the
/// fingerprinter (so this instance names what follows as the others do); returns where
/// this instance's writes continue.
fn install(outbox: &mut Outbox, plan: Plan) -> Cursor {
    let mut run: Vec<(u64, Bytes)> = Vec::new();
    let mut cursor = Cursor::Joined(None);
    for entry in plan.prefix {
        match entry {
            Entry::Message(fp, payload) => {
                outbox.fingerprints.next(&payload);
                run.push((fp, payload));
                if run.len() == FRAME_MESSAGES {
                    push_run(outbox, &mut run);
                }
                cursor = Cursor::Joined(Some(fp));
            }
            Entry::Gap => {
                push_run(outbox, &mut run);
                push_gap(outbox);
                cursor = Cursor::Gap;
            }
        }
    }
    push_run(outbox, &mut run);
    if plan.gap {
        push_gap(outbox);
        cursor = Cursor::Gap;
    }
    cursor
}

fn push_run(outbox: &mut Outbox, run: &mut Vec<(u64, Bytes)>) {
    let Some(&(last, _)) = run.last() else { return };
    let (fps, payloads): (Vec<u64>, Vec<Bytes>) = run.drain(..).unzip();
    let batch = frame::batch(Position::after(last), &payloads);
    outbox.replay.push_batch(batch, fps);
}

fn push_gap(outbox: &mut Outbox) {
    outbox.fingerprints.gap();
    let id = outbox.replay.last_message();
    let notice = frame::reset(
        (id != 0).then_some(Position {
            after: id,
            reset: true,
        }),
        "messages may be lost here",
    );
    outbox.replay.push_notice(notice);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u64) -> Entry {
        Entry::Message(i, Bytes::from(format!("m{i}")))
    }

    fn ours(range: std::ops::RangeInclusive<u64>) -> Vec<Bytes> {
        range.map(|i| Bytes::from(format!("m{i}"))).collect()
    }

    fn snapshot(base: u64, answer: Option<u64>, entries: Vec<Entry>) -> Snapshot {
        Snapshot {
            base,
            answer,
            entries,
        }
    }

    #[test]
    fn an_answer_cuts_the_history_where_our_messages_begin() {
        // The history holds m1..m6 (places 11..16); we got m4, m5 before our request,
        // which fell after m5 (place 15), and m6 after it.
        let s = snapshot(10, Some(15), (1..=6).map(msg).collect());
        let p = plan(&s, &ours(4..=6), Some(2));
        assert_eq!(p.how, "answered");
        assert_eq!(p.prefix, (1..=3).map(msg).collect::<Vec<_>>());
        assert!(!p.gap);
    }

    #[test]
    fn an_answer_that_does_not_match_our_messages_is_not_trusted() {
        let s = snapshot(10, Some(15), (1..=6).map(msg).collect());
        let p = plan(&s, &ours(7..=8), Some(2));
        assert_eq!(p.how, "unanswered");
        assert!(p.gap);
        assert_eq!(p.prefix.len(), 6);
    }

    #[test]
    fn without_an_answer_an_overlap_still_proves_the_join() {
        let s = snapshot(0, None, (1..=6).map(msg).collect());
        let p = plan(&s, &ours(5..=9), None);
        assert_eq!(p.how, "overlap");
        assert_eq!(p.prefix, (1..=4).map(msg).collect::<Vec<_>>());
        assert!(!p.gap);
    }

    #[test]
    fn an_empty_history_needs_nothing_and_a_gap_is_not_doubled() {
        assert_eq!(
            plan(&snapshot(0, None, vec![]), &ours(1..=2), None).how,
            "empty"
        );
        let s = snapshot(0, None, vec![msg(1), Entry::Gap]);
        let p = plan(&s, &ours(5..=6), None);
        assert!(!p.gap, "the history already ends in a gap");
    }

    #[test]
    fn installing_names_the_prefix_and_marks_the_gap() {
        let mut outbox = Outbox::new(
            crate::replay::ReplayBuffer::new(100, 1 << 20, Default::default()),
            4,
            crate::viewer::Viewers::new(Default::default()),
            crate::class::Classes::new(Default::default(), Default::default()),
        );
        let plan = Plan {
            prefix: vec![msg(1), msg(2)],
            gap: true,
            how: "unanswered",
        };
        assert_eq!(install(&mut outbox, plan), Cursor::Gap);
        assert_eq!(outbox.replay.last_message(), 2);
        let crate::replay::Resume::Frames { frames, .. } =
            outbox.replay.since(Position::after(1), usize::MAX)
        else {
            panic!("lost");
        };
        assert_eq!(frames.len(), 2, "the rest of the batch, then the reset");
        assert!(
            std::str::from_utf8(&frames[1].bytes)
                .unwrap()
                .contains("event: reset")
        );
    }
}
