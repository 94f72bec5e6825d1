//! Herald's durable state: persistent sessions, the messages queued for them while they are
//! offline, and retained messages.
//!
//! The rest of the broker sees only the [`Store`] trait and the plain data types defined here.
//! The storage engine (redb) stays inside [`RedbStore`]; [`MemoryStore`] has the same semantics
//! without a disk, for tests. This crate knows nothing of MQTT rules: it stores what it is given
//! and does not check that a queued message belongs to a session that exists.
//!
//! Writes arrive as batches of [`Op`]s. A batch is applied in one transaction, so the router's
//! group commit (one batch per round of its storage thread) is atomic. Every op is idempotent,
//! which is what lets [`RedbStore`] replay its write-ahead log after a crash.

mod codec;
mod error;
mod memory;
mod redb_store;
#[cfg(test)]
mod redb_tests;
mod wal;

#[cfg(test)]
mod conformance;

use std::fmt;

pub use error::StoreError;
pub use memory::MemoryStore;
pub use redb_store::{FORMAT_VERSION, RedbStore};

/// A message kept on disk (queued for a persistent session, or retained).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: bytes::Bytes,
    pub qos: u8,
    pub retain: bool,
    pub published_at_ms: u64,
}

// Payloads are user data: logs show their length only.
impl fmt::Debug for StoredMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredMessage")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("published_at_ms", &self.published_at_ms)
            .finish()
    }
}

/// What a persistent session needs to come back after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    /// (filter, granted qos)
    pub subscriptions: Vec<(String, u8)>,
    pub created_at_ms: u64,
}

/// One change to the stored state. All ops are idempotent: applying a batch twice leaves the
/// same state as applying it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces the session record of `client_id`.
    PutSession {
        client_id: String,
        record: SessionRecord,
    },
    /// Deletes the session record and every message queued for it.
    DeleteSession { client_id: String },
    /// Queues `message` for `client_id` under `seq` (replacing what was there).
    Enqueue {
        client_id: String,
        seq: u64,
        message: StoredMessage,
    },
    /// Removes the message queued for `client_id` under `seq`, if any.
    Dequeue { client_id: String, seq: u64 },
    /// Creates or replaces the retained message of `message.topic`.
    PutRetained { message: StoredMessage },
    /// Removes the retained message of `topic`, if any.
    DeleteRetained { topic: String },
}

/// Everything in a store, as read at start-up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Sorted by client id.
    pub sessions: Vec<(String, SessionRecord)>,
    /// Per client id (sorted), its queued messages in seq order. Clients without queued
    /// messages are left out.
    pub queues: Vec<(String, Vec<(u64, StoredMessage)>)>,
    /// Sorted by topic.
    pub retained: Vec<StoredMessage>,
    /// One more than the largest seq ever stored (0 if none), even if that message has since
    /// been dequeued; seqs are global across clients.
    pub next_seq: u64,
}

/// When [`RedbStore`] makes a batch durable against power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every [`Store::apply`] is fsynced before it returns.
    Always,
    /// [`Store::apply`] survives a process crash at once and a power loss after the next
    /// [`Store::flush`], which the caller runs every `millis`.
    Interval { millis: u64 },
}

/// The broker's storage. One thread owns it; calls are blocking.
pub trait Store: Send + 'static {
    /// Reads everything at start-up.
    fn load(&mut self) -> Result<Snapshot, StoreError>;

    /// Applies a batch in ONE transaction: all or nothing. When it returns Ok, the batch
    /// survives a crash of the process ([`SyncMode::Always`]: also a power loss, i.e. fsynced).
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError>;

    /// Makes everything applied so far durable against power loss (called on the interval timer
    /// and at shutdown). No-op for [`SyncMode::Always`].
    fn flush(&mut self) -> Result<(), StoreError>;
}
