//! Herald's durable state: persistent sessions, the messages queued for them while they are
//! offline (with the QoS 2 state that keeps them exactly once across a crash), retained
//! messages, issued tokens and device credentials; and for presence, each client id's last
//! event seq, the channels that are open, a durable outbox per sink and a bounded history of
//! events per client.
//!
//! The rest of the broker sees only the [`Store`] trait and the plain data types defined here.
//! The storage engine (redb) stays inside [`RedbStore`]; [`MemoryStore`] has the same semantics
//! without a disk, for tests. This crate knows nothing of MQTT rules: it stores what it is given
//! and does not check that a queued message belongs to a session that exists, nor that an
//! outbox belongs to a configured sink; bounding the outboxes and the history (by pruning) is
//! the caller's job too.
//!
//! Writes arrive as batches of [`Op`]s. A batch is applied all or nothing (in [`RedbStore`], one
//! record of its write-ahead log, later part of one database transaction), so the router's group
//! commit (one batch per round of its storage thread) is atomic. Every op is idempotent, which
//! is what lets [`RedbStore`] replay its write-ahead log after a crash.

mod codec;
mod debug;
mod error;
mod memory;
mod redb_read;
mod redb_store;
#[cfg(test)]
mod redb_tests;
mod wal;

#[cfg(test)]
mod conformance;

use std::fmt;

pub use error::StoreError;
pub use memory::MemoryStore;
pub use redb_store::{DEFAULT_CACHE_BYTES, FORMAT_VERSION, RedbStore};

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

/// A channel recorded as open (the router records one only where its client's newest presence
/// history entry would not show it open; older builds recorded every channel at connect),
/// deleted when it ends. After a crash, the records left are channels that need a `tcpclean`
/// with reason `broker_restart`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRecord {
    pub client_id: String,
    /// Opaque bytes the router needs to build the channel's tcpclean event (JSON).
    pub info: bytes::Bytes,
}

/// A token issued by the admin API (DESIGN.md 3.2). The token string itself is the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Topic filters the token grants.
    pub resources: Vec<String>,
    /// Bit 1: read (subscribe, receive); bit 2: write (publish).
    pub actions: u8,
    /// When the token stops being valid, ms since the Unix epoch.
    pub expire_at_ms: u64,
}

/// A device credential (DESIGN.md 3.3), keyed by the client id it is bound to.
// Debug is written by hand (in `debug`): the secret never shows.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub key_id: String,
    pub secret: String,
    pub created_at_ms: u64,
}

/// One change to the stored state. All ops are idempotent: applying a batch twice leaves the
/// same state as applying it once.
// Debug is written by hand (in `debug`): outbox and history payloads may carry user data.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces the session record of `client_id`.
    PutSession {
        client_id: String,
        record: SessionRecord,
    },
    /// Deletes the session record, every message queued for it (and their released marks) and
    /// its QoS 2 ids awaiting PUBREL.
    DeleteSession { client_id: String },
    /// Records that the QoS 2 PUBLISH `packet_id` of `client_id` was routed and waits for its
    /// PUBREL: a retransmission after a restart must not be routed again.
    PutIncomingQos2 { client_id: String, packet_id: u16 },
    /// The PUBREL of `packet_id` came: the id is free again.
    DeleteIncomingQos2 { client_id: String, packet_id: u16 },
    /// Queues `message` for `client_id` under `seq` (replacing what was there).
    Enqueue {
        client_id: String,
        seq: u64,
        message: StoredMessage,
    },
    /// Removes the message queued for `client_id` under `seq`, if any, and its released mark.
    Dequeue { client_id: String, seq: u64 },
    /// Marks the QoS 2 message queued for `client_id` under `seq` as released: the client
    /// sent PUBREC, so after a restart the broker resends PUBREL, not the PUBLISH.
    PutReleased { client_id: String, seq: u64 },
    /// Creates or replaces the retained message of `message.topic`.
    PutRetained { message: StoredMessage },
    /// Removes the retained message of `topic`, if any.
    DeleteRetained { topic: String },
    /// Sets the last presence event seq of `client_id` (replacing what was there; the store
    /// does not check that it grows). The router no longer stages it (a client's seq is that
    /// of its newest history entry); kept so that a log an older Herald wrote still replays.
    PutClientSeq { client_id: String, seq: u64 },
    /// Records the open channel `channel_id` (replacing what was there).
    PutChannel {
        channel_id: u128,
        record: ChannelRecord,
    },
    /// Forgets the channel `channel_id`, if recorded.
    DeleteChannel { channel_id: u128 },
    /// Puts `payload` in the outbox of `sink` under `id` (replacing what was there).
    PutOutbox {
        sink: String,
        id: u64,
        payload: bytes::Bytes,
    },
    /// Removes the entry `id` of the outbox of `sink`, if any.
    DeleteOutbox { sink: String, id: u64 },
    /// Adds the presence event `seq` of `client_id`, seen at `time_ms`, to its history
    /// (replacing what was there).
    PutHistory {
        client_id: String,
        seq: u64,
        time_ms: u64,
        payload: bytes::Bytes,
    },
    /// Deletes the history entries of `client_id` with a seq below `below_seq`.
    PruneHistory { client_id: String, below_seq: u64 },
    /// Creates or replaces the token `token`.
    PutToken { token: String, record: TokenRecord },
    /// Forgets the token `token`, if stored.
    DeleteToken { token: String },
    /// Creates or replaces the device credential bound to `client_id`.
    PutCredential {
        client_id: String,
        record: CredentialRecord,
    },
    /// Forgets the device credential bound to `client_id`, if stored.
    DeleteCredential { client_id: String },
}

/// Everything in a store, as read at start-up, except the presence history (read it with
/// [`Store::history`]).
// Debug is written by hand (in `debug`): outbox payloads may carry user data.
#[derive(Default, Clone, PartialEq, Eq)]
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
    /// The seqs [`Op::PutClientSeq`] set, sorted by client id. A client's last presence event
    /// seq is the larger of this and the seq of its newest history entry
    /// ([`Store::last_events`]).
    pub client_seqs: Vec<(String, u64)>,
    /// The channels recorded as open, sorted by channel id.
    pub channels: Vec<(u128, ChannelRecord)>,
    /// Per sink id (sorted), its outbox entries in id order. Sinks with an empty outbox are
    /// left out.
    pub outboxes: Vec<(String, Vec<(u64, bytes::Bytes)>)>,
    /// One more than the largest outbox id ever stored (0 if none), even if that entry has since
    /// been deleted; ids are global across sinks.
    pub next_outbox_id: u64,
    /// Issued tokens (expired ones included until deleted), sorted by token.
    pub tokens: Vec<(String, TokenRecord)>,
    /// Device credentials, sorted by client id.
    pub credentials: Vec<(String, CredentialRecord)>,
    /// Per client id (sorted), the QoS 2 packet ids it published that await PUBREL, sorted.
    /// Clients without any are left out.
    pub incoming_qos2: Vec<(String, Vec<u16>)>,
    /// Per client id (sorted), the seqs of its queued QoS 2 messages marked released, sorted.
    /// Clients without any are left out.
    pub released: Vec<(String, Vec<u64>)>,
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

/// What [`Store::last_events`] calls for each client: `(client id, seq, time in ms, payload)`.
pub type OnLastEvent<'a> = dyn FnMut(&str, u64, u64, &[u8]) + 'a;

/// The broker's storage. One thread owns it; calls are blocking.
pub trait Store: Send + 'static {
    /// Reads everything at start-up.
    fn load(&mut self) -> Result<Snapshot, StoreError>;

    /// Applies a batch, all or nothing ([`RedbStore`]: one record of its write-ahead log, later
    /// within one database transaction). When it returns Ok, the batch survives a crash of the
    /// process ([`SyncMode::Always`]: also a power loss, i.e. fsynced).
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError>;

    /// Makes everything applied so far durable against power loss (called on the router's
    /// timer and at shutdown; already so with [`SyncMode::Always`]). [`RedbStore`] also starts
    /// writing the operations its log holds into the database.
    fn flush(&mut self) -> Result<(), StoreError>;

    /// At shutdown: makes everything applied durable and leaves the store quick to open
    /// ([`RedbStore`]: every logged operation in the database, and an empty log).
    fn close(&mut self) -> Result<(), StoreError> {
        self.flush()
    }

    /// Presence history of one client: payloads of entries with
    /// `from_ms <= time_ms <= to_ms`, oldest first, at most `limit`.
    ///
    /// Returns `(seq, time_ms, payload)` in seq order, i.e. the order the events were emitted
    /// in, even where a clock step made `time_ms` go backwards. Reads everything applied so far.
    fn history(
        &mut self,
        client_id: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64, bytes::Bytes)>, StoreError>;

    /// The payloads of the history entries `(client id, seq)`, in the order asked for, `None`
    /// where there is none (never written, or pruned). One read of the store for all of them.
    /// Reads everything applied so far.
    fn history_entries(
        &mut self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<Option<bytes::Bytes>>, StoreError>;

    /// Calls `each` with the newest presence history entry of every client id that has one, in
    /// client id order: `(client id, seq, time in ms, payload)`. Two seeks per client, not a
    /// read of the whole history, and each payload is lent for the call only, so that a start
    /// with many clients does not hold all of them at once. An entry whose value does not
    /// decode is given with time 0 and an empty payload (its seq is in its key).
    fn last_events(&mut self, each: &mut OnLastEvent<'_>) -> Result<(), StoreError>;
}
