//! [`MemoryStore`]: the [`Store`] semantics in plain maps, for tests of the crates above.
//!
//! It owns nothing on disk, so "durable" means "until the value is dropped"; `flush` does
//! nothing. The shared behavioural tests (`conformance`) hold it to the same results as
//! [`crate::RedbStore`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::Bytes;

use crate::{
    ChannelRecord, CredentialRecord, Op, SessionRecord, Snapshot, Store, StoreError, StoredMessage,
    TokenRecord,
};

/// An in-memory [`Store`].
#[derive(Default, Clone)]
pub struct MemoryStore {
    sessions: BTreeMap<String, SessionRecord>,
    /// client id → seq → message; a client with no message has no entry.
    queues: BTreeMap<String, BTreeMap<u64, StoredMessage>>,
    retained: BTreeMap<String, StoredMessage>,
    next_seq: u64,
    client_seqs: BTreeMap<String, u64>,
    channels: BTreeMap<u128, ChannelRecord>,
    /// sink id → outbox id → payload; a sink with an empty outbox has no entry.
    outboxes: BTreeMap<String, BTreeMap<u64, Bytes>>,
    next_outbox_id: u64,
    /// client id → seq → (time, payload); a client with no history has no entry.
    history: BTreeMap<String, BTreeMap<u64, (u64, Bytes)>>,
    tokens: BTreeMap<String, TokenRecord>,
    credentials: BTreeMap<String, CredentialRecord>,
    /// client id → QoS 2 packet ids awaiting PUBREL; a client with none has no entry.
    incoming_qos2: BTreeMap<String, BTreeSet<u16>>,
    /// client id → seqs of queued messages marked released; a client with none has no entry.
    released: BTreeMap<String, BTreeSet<u64>>,
}

// Counts only: outbox and history payloads may carry user data.
impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("sessions", &self.sessions.len())
            .field("queues", &self.queues.len())
            .field("retained", &self.retained.len())
            .field("next_seq", &self.next_seq)
            .field("client_seqs", &self.client_seqs.len())
            .field("channels", &self.channels.len())
            .field("outboxes", &self.outboxes.len())
            .field("next_outbox_id", &self.next_outbox_id)
            .field("history", &self.history.len())
            .field("tokens", &self.tokens.len())
            .field("credentials", &self.credentials.len())
            .field("incoming_qos2", &self.incoming_qos2.len())
            .field("released", &self.released.len())
            .finish()
    }
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
                self.incoming_qos2.remove(client_id);
                self.released.remove(client_id);
            }
            Op::PutIncomingQos2 {
                client_id,
                packet_id,
            } => {
                self.incoming_qos2
                    .entry(client_id.clone())
                    .or_default()
                    .insert(*packet_id);
            }
            Op::DeleteIncomingQos2 {
                client_id,
                packet_id,
            } => remove_and_drop_empty(&mut self.incoming_qos2, client_id, |ids| {
                ids.remove(packet_id);
            }),
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
                remove_and_drop_empty(&mut self.queues, client_id, |queue| {
                    queue.remove(seq);
                });
                remove_and_drop_empty(&mut self.released, client_id, |seqs| {
                    seqs.remove(seq);
                });
            }
            Op::PutReleased { client_id, seq } => {
                self.released
                    .entry(client_id.clone())
                    .or_default()
                    .insert(*seq);
            }
            Op::PutRetained { message } => {
                self.retained.insert(message.topic.clone(), message.clone());
            }
            Op::DeleteRetained { topic } => {
                self.retained.remove(topic);
            }
            Op::PutClientSeq { client_id, seq } => {
                self.client_seqs.insert(client_id.clone(), *seq);
            }
            Op::PutChannel { channel_id, record } => {
                self.channels.insert(*channel_id, record.clone());
            }
            Op::DeleteChannel { channel_id } => {
                self.channels.remove(channel_id);
            }
            Op::PutOutbox { sink, id, payload } => {
                self.outboxes
                    .entry(sink.clone())
                    .or_default()
                    .insert(*id, payload.clone());
                self.next_outbox_id = self.next_outbox_id.max(id.saturating_add(1));
            }
            Op::DeleteOutbox { sink, id } => remove_and_drop_empty(&mut self.outboxes, sink, |o| {
                o.remove(id);
            }),
            Op::PutHistory {
                client_id,
                seq,
                time_ms,
                payload,
            } => {
                self.history
                    .entry(client_id.clone())
                    .or_default()
                    .insert(*seq, (*time_ms, payload.clone()));
            }
            Op::PruneHistory {
                client_id,
                below_seq,
            } => remove_and_drop_empty(&mut self.history, client_id, |entries| {
                *entries = entries.split_off(below_seq);
            }),
            Op::PutToken { token, record } => {
                self.tokens.insert(token.clone(), record.clone());
            }
            Op::DeleteToken { token } => {
                self.tokens.remove(token);
            }
            Op::PutCredential { client_id, record } => {
                self.credentials.insert(client_id.clone(), record.clone());
            }
            Op::DeleteCredential { client_id } => {
                self.credentials.remove(client_id);
            }
        }
    }
}

/// Runs `remove` on the inner collection of `key`, then drops it if it is left empty.
fn remove_and_drop_empty<C: Emptiable>(
    maps: &mut BTreeMap<String, C>,
    key: &str,
    remove: impl FnOnce(&mut C),
) {
    if let Some(inner) = maps.get_mut(key) {
        remove(inner);
        if inner.is_empty() {
            maps.remove(key);
        }
    }
}

/// The inner collections of the per-client maps.
trait Emptiable {
    fn is_empty(&self) -> bool;
}

impl<K, V> Emptiable for BTreeMap<K, V> {
    fn is_empty(&self) -> bool {
        BTreeMap::is_empty(self)
    }
}

impl<T> Emptiable for BTreeSet<T> {
    fn is_empty(&self) -> bool {
        BTreeSet::is_empty(self)
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
            client_seqs: self
                .client_seqs
                .iter()
                .map(|(id, seq)| (id.clone(), *seq))
                .collect(),
            channels: self
                .channels
                .iter()
                .map(|(id, record)| (*id, record.clone()))
                .collect(),
            outboxes: self
                .outboxes
                .iter()
                .map(|(sink, outbox)| {
                    let entries = outbox.iter().map(|(id, p)| (*id, p.clone())).collect();
                    (sink.clone(), entries)
                })
                .collect(),
            next_outbox_id: self.next_outbox_id,
            tokens: self
                .tokens
                .iter()
                .map(|(t, r)| (t.clone(), r.clone()))
                .collect(),
            credentials: self
                .credentials
                .iter()
                .map(|(c, r)| (c.clone(), r.clone()))
                .collect(),
            incoming_qos2: self
                .incoming_qos2
                .iter()
                .map(|(c, ids)| (c.clone(), ids.iter().copied().collect()))
                .collect(),
            released: self
                .released
                .iter()
                .map(|(c, seqs)| (c.clone(), seqs.iter().copied().collect()))
                .collect(),
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

    fn history(
        &mut self,
        client_id: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64, Bytes)>, StoreError> {
        let Some(entries) = self.history.get(client_id) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .filter(|(_, (time_ms, _))| (from_ms..=to_ms).contains(time_ms))
            .take(limit)
            .map(|(seq, (time_ms, payload))| (*seq, *time_ms, payload.clone()))
            .collect())
    }

    fn last_events(&mut self, each: &mut crate::OnLastEvent<'_>) -> Result<(), StoreError> {
        for (id, entries) in &self.history {
            if let Some((seq, (time_ms, payload))) = entries.last_key_value() {
                each(id, *seq, *time_ms, payload);
            }
        }
        Ok(())
    }

    fn history_entries(
        &mut self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        Ok(wanted
            .iter()
            .map(|(client_id, seq)| {
                let entries = self.history.get(client_id)?;
                entries.get(seq).map(|(_, payload)| payload.clone())
            })
            .collect())
    }
}
