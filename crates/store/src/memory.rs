//! [`MemoryStore`]: the [`Store`] semantics in plain maps, for tests of the crates above.
//!
//! It owns nothing on disk, so "durable" means "until the value is dropped"; `flush` does
//! nothing. The shared behavioural tests (`conformance`) hold it to the same results as
//! [`crate::RedbStore`].

use std::collections::BTreeMap;

use crate::{Op, SessionRecord, Snapshot, Store, StoreError, StoredMessage};

/// An in-memory [`Store`].
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    sessions: BTreeMap<String, SessionRecord>,
    /// client id → seq → message; a client with no message has no entry.
    queues: BTreeMap<String, BTreeMap<u64, StoredMessage>>,
    retained: BTreeMap<String, StoredMessage>,
    next_seq: u64,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn apply_one(&mut self, op: &Op) {
        match op {
            Op::PutSession { client_id, record } => {
                self.sessions.insert(client_id.clone(), record.clone());
            }
            Op::DeleteSession { client_id } => {
                self.sessions.remove(client_id);
                self.queues.remove(client_id);
            }
            Op::Enqueue {
                client_id,
                seq,
                message,
            } => {
                self.queues
                    .entry(client_id.clone())
                    .or_default()
                    .insert(*seq, message.clone());
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
            }
            Op::Dequeue { client_id, seq } => {
                if let Some(queue) = self.queues.get_mut(client_id) {
                    queue.remove(seq);
                    if queue.is_empty() {
                        self.queues.remove(client_id);
                    }
                }
            }
            Op::PutRetained { message } => {
                self.retained.insert(message.topic.clone(), message.clone());
            }
            Op::DeleteRetained { topic } => {
                self.retained.remove(topic);
            }
        }
    }
}

impl Store for MemoryStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            sessions: self
                .sessions
                .iter()
                .map(|(id, record)| (id.clone(), record.clone()))
                .collect(),
            queues: self
                .queues
                .iter()
                .map(|(id, queue)| {
                    let messages = queue.iter().map(|(seq, m)| (*seq, m.clone())).collect();
                    (id.clone(), messages)
                })
                .collect(),
            retained: self.retained.values().cloned().collect(),
            next_seq: self.next_seq,
        })
    }

    // No op can fail here, so a batch is trivially all or nothing.
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            self.apply_one(op);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}
