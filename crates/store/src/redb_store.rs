//! [`RedbStore`]: the [`Store`] on disk, in one redb file `herald.redb` in the data directory,
//! plus the write-ahead log `herald.wal` in interval mode (see `wal`).
//!
//! Owns the key schema, the format version check, start-up recovery (integrity check, log
//! replay, compaction) and the mapping of [`Op`]s onto tables. It does not own the value
//! layout (`codec`), the log's file format (`wal`) nor reading the tables back (`redb_read`).
//!
//! Tables:
//! - `meta`: `&str → u64`; `format_version` ([`FORMAT_VERSION`]), `next_seq` (one more than
//!   the largest seq ever enqueued) and `next_outbox_id` (the same for outbox ids).
//! - `sessions`: client id → encoded [`crate::SessionRecord`].
//! - `queue`: `(client id, seq)` → encoded [`crate::StoredMessage`]. redb compares tuple keys
//!   field by field and `u64` keys as numbers, so a client's messages are contiguous and iterate
//!   in seq (delivery) order; deleting a session is one range delete.
//! - `retained`: topic → encoded [`crate::StoredMessage`].
//! - `client_seqs`: client id → its last presence event seq, as format 1 wrote it (read only).
//! - `channels`: channel id (`u128`, compared as a number) → encoded [`crate::ChannelRecord`].
//! - `outbox`: `(sink id, outbox id)` → encoded payload; a sink's entries are contiguous, in id
//!   order, as in `queue`.
//! - `history`: `(client id, event seq)` → encoded time and payload; pruning a client's oldest
//!   entries is one range delete.
//!
//! - `tokens`: token → encoded [`crate::TokenRecord`].
//! - `credentials`: client id → encoded [`crate::CredentialRecord`].
//! - `incoming_qos2`: `(client id, packet id)` → nothing: the QoS 2 PUBLISHes of persistent
//!   sessions that were routed and await their PUBREL.
//! - `released`: `(client id, seq)` → nothing: queued QoS 2 messages the client has PUBRECed,
//!   to be completed with PUBREL after a restart.
//!
//! `client_seqs` to `history` came with presence, `tokens` and `credentials` with the token and
//! device-credential modes, `incoming_qos2` and `released` later, all under format 1: a Herald
//! from before ignores them, and this one creates them when it opens a file that lacks them.
//! Format 2 stopped writing `client_seqs` (see [`FORMAT_VERSION`]).
//!
//! Durability: [`SyncMode::Always`] commits every batch with `Durability::Immediate` (fsync).
//! [`SyncMode::Interval`] appends the batch to the log (survives a process crash), then commits
//! with `Durability::None`; [`Store::flush`] commits durably and empties the log. [`RedbStore::open`]
//! replays the log in either mode, so a directory can switch modes between runs.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use redb::{
    Builder, Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition,
    TableError, TableHandle,
};
use std::collections::BTreeSet;
use tracing::{debug, info, warn};

use crate::codec::{self, TooLarge};
use crate::error::EngineContext;
use crate::wal::{Recovered, Wal};
use crate::{Op, Snapshot, Store, StoreError, SyncMode, redb_read};

/// The layout of the data directory this Herald reads and writes. A directory with a larger
/// version is refused with [`StoreError::NewerFormat`]; one with a version from
/// [`OLDEST_READABLE_FORMAT`] on is read and marked with this version at open.
///
/// 2: a client's presence seq and `$presence` snapshot are no longer written with each event
/// (`client_seqs` and `retained`) but read back from its newest `history` entry. A Herald
/// that writes version 1 would start from stale seqs in such a directory (and issue event ids
/// again), so the version tells it to refuse the directory.
pub const FORMAT_VERSION: u64 = 2;

/// The oldest format this Herald reads (and upgrades).
pub const OLDEST_READABLE_FORMAT: u64 = 1;

pub(crate) const DB_FILE: &str = "herald.redb";

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
pub(crate) const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
pub(crate) const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
pub(crate) const CLIENT_SEQS: TableDefinition<&str, u64> = TableDefinition::new("client_seqs");
pub(crate) const CHANNELS: TableDefinition<u128, &[u8]> = TableDefinition::new("channels");
pub(crate) const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
pub(crate) const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
pub(crate) const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
pub(crate) const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
pub(crate) const INCOMING_QOS2: TableDefinition<(&str, u16), ()> =
    TableDefinition::new("incoming_qos2");
pub(crate) const RELEASED: TableDefinition<(&str, u64), ()> = TableDefinition::new("released");

pub(crate) const KEY_FORMAT_VERSION: &str = "format_version";
pub(crate) const KEY_NEXT_SEQ: &str = "next_seq";
pub(crate) const KEY_NEXT_OUTBOX_ID: &str = "next_outbox_id";

/// redb's page cache unless the caller sets one (`storage.cache_mb`). redb's default (1 GiB) is
/// sized for a database server. The broker reads its tables once, at start-up, and then mostly
/// writes (its only reads are the admin API's history queries): the cache holds the B-tree
/// pages commits touch, and pages that fall out of it are read back from the OS page cache. Every
/// byte of it counts in the broker's resident memory; 1 MiB and 4 MiB measured the same CPU per
/// connect and the same durable-queue rates (docs/benchmarks.md), so the smaller is the default.
pub const DEFAULT_CACHE_BYTES: usize = 1024 * 1024;

/// In interval mode, a log that grows past this is flushed by `apply` itself, so that a caller
/// that rarely flushes does not make start-up replay unbounded.
const WAL_FLUSH_BYTES: u64 = 64 * 1024 * 1024;

/// A [`Store`] in a redb database.
pub struct RedbStore {
    db: Database,
    db_path: PathBuf,
    sync: SyncMode,
    /// The open log in interval mode; `None` in always mode.
    wal: Option<Wal>,
    /// Interval mode: batches were applied since the last durable commit.
    unflushed: bool,
    /// Set when a failed write could not be undone; see [`StoreError::Unusable`].
    unusable: bool,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.db_path)
            .field("sync", &self.sync)
            .field("unflushed", &self.unflushed)
            .field("unusable", &self.unusable)
            .finish_non_exhaustive()
    }
}

/// Every table, open in one write transaction.
struct Tables<'txn> {
    meta: Table<'txn, &'static str, u64>,
    sessions: Table<'txn, &'static str, &'static [u8]>,
    queue: Table<'txn, (&'static str, u64), &'static [u8]>,
    retained: Table<'txn, &'static str, &'static [u8]>,
    client_seqs: Table<'txn, &'static str, u64>,
    channels: Table<'txn, u128, &'static [u8]>,
    outbox: Table<'txn, (&'static str, u64), &'static [u8]>,
    history: Table<'txn, (&'static str, u64), &'static [u8]>,
    tokens: Table<'txn, &'static str, &'static [u8]>,
    credentials: Table<'txn, &'static str, &'static [u8]>,
    incoming_qos2: Table<'txn, (&'static str, u16), ()>,
    released: Table<'txn, (&'static str, u64), ()>,
}

/// The two counters of `meta` that ops move forward.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Counters {
    next_seq: u64,
    next_outbox_id: u64,
}

impl RedbStore {
    /// Opens the store in `data_dir` (created if missing), or creates it.
    ///
    /// Start-up work, in order: check every page's checksum (a file redb did not write is
    /// refused rather than trusted), check the format version, create the tables a file from an
    /// earlier Herald lacks, replay the write-ahead log and commit it durably, compact the file
    /// (redb otherwise keeps it at its high-water mark), then start an empty log in interval
    /// mode or remove it in always mode.
    pub fn open(data_dir: &Path, sync: SyncMode) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_cache(data_dir, sync, DEFAULT_CACHE_BYTES)
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        data_dir: &Path,
        sync: SyncMode,
        cache_bytes: usize,
    ) -> Result<RedbStore, StoreError> {
        fs::create_dir_all(data_dir).map_err(|e| StoreError::io(data_dir, e))?;
        let db_path = data_dir.join(DB_FILE);
        let log = Wal::read(data_dir)?;
        let pending = log.as_ref().filter(|log| !log.records.is_empty());
        // Checked before redb creates a file, so that a refused start leaves the directory as
        // it was.
        if let Some(pending) = pending
            && !has_bytes(&db_path)?
        {
            return Err(orphan_log(pending, &db_path));
        }
        let mut db = Builder::new()
            .set_cache_size(cache_bytes)
            .set_check_integrity_on_open(true)
            .create(&db_path)
            .at(&db_path, "opening the database")?;

        let fresh = check_format(&db, &db_path)?;
        if fresh {
            if let Some(pending) = pending {
                return Err(orphan_log(pending, &db_path));
            }
            initialize(&db, &db_path)?;
        } else {
            add_missing_tables(&db, &db_path)?;
        }
        let recovered = match log {
            Some(log) => Some(replay_log(&db, &db_path, log)?),
            None => None,
        };
        if !fresh {
            upgrade_format(&db, &db_path)?;
        }
        let compacted = db.compact().at(&db_path, "compacting")?;
        debug!(path = %db_path.display(), compacted, "compaction at start-up done");

        let wal = match sync {
            SyncMode::Always => {
                if recovered.is_some() {
                    Wal::remove(data_dir)?;
                }
                None
            }
            SyncMode::Interval { .. } => {
                let generation = recovered.map_or(1, |generation| generation.wrapping_add(1));
                Some(Wal::create(data_dir, generation)?)
            }
        };
        info!(path = %db_path.display(), ?sync, fresh, "store open");
        Ok(RedbStore {
            db,
            db_path,
            sync,
            wal,
            unflushed: false,
            unusable: false,
        })
    }

    fn apply_logged(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let Some(wal) = self.wal.as_mut() else {
            return commit(&self.db, &self.db_path, ops, Durability::Immediate);
        };
        let payload = codec::encode_batch(ops).map_err(|e| too_large(&self.db_path, &e))?;
        let mark = wal.len();
        let written = wal
            .append(&payload)
            .and_then(|()| commit(&self.db, &self.db_path, ops, Durability::None));
        if let Err(error) = written {
            // Undo the record, or a later replay would apply a batch reported as failed.
            if let Err(undo) = wal.truncate(mark) {
                warn!(
                    path = %wal.path().display(),
                    %error,
                    %undo,
                    "could not remove a failed batch from the write-ahead log"
                );
                self.unusable = true;
            }
            return Err(error);
        }
        self.unflushed = true;
        if wal.len() > WAL_FLUSH_BYTES {
            // The batch is applied and logged: a failure here is retried by the next flush.
            if let Err(error) = self.flush() {
                warn!(%error, "flushing a full write-ahead log failed");
            }
        }
        Ok(())
    }

    fn unusable_error(&self) -> StoreError {
        StoreError::Unusable {
            path: self.db_path.clone(),
        }
    }
}

impl Store for RedbStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        redb_read::load(&self.db, &self.db_path)
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        if self.unusable {
            return Err(self.unusable_error());
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.apply_logged(ops)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.unusable {
            return Err(self.unusable_error());
        }
        let Some(wal) = self.wal.as_mut() else {
            return Ok(());
        };
        if !self.unflushed {
            return Ok(());
        }
        // An empty commit with Immediate durability makes the earlier Durability::None commits
        // durable too.
        commit(&self.db, &self.db_path, &[], Durability::Immediate)?;
        self.unflushed = false;
        wal.reset()
    }

    fn history(
        &mut self,
        client_id: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64, bytes::Bytes)>, StoreError> {
        redb_read::history(&self.db, &self.db_path, client_id, from_ms..=to_ms, limit)
    }

    fn history_entries(
        &mut self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<Option<bytes::Bytes>>, StoreError> {
        redb_read::history_entries(&self.db, &self.db_path, wanted)
    }

    fn last_events(&mut self, each: &mut crate::OnLastEvent<'_>) -> Result<(), StoreError> {
        redb_read::last_events(&self.db, &self.db_path, each)
    }
}

/// Returns whether the database is new (has no table at all), after checking that an existing
/// one was written by a Herald that uses this format.
fn check_format(db: &Database, path: &Path) -> Result<bool, StoreError> {
    let txn = db.begin_read().at(path, "reading")?;
    let tables: Vec<String> = txn
        .list_tables()
        .at(path, "listing tables")?
        .map(|table| table.name().to_owned())
        .collect();
    if tables.is_empty() {
        return Ok(true);
    }
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(TableError::TableDoesNotExist(_)) => {
            return Err(StoreError::Corrupt(format!(
                "{}: a redb database with tables {tables:?} but no format version: not written \
                 by Herald",
                path.display()
            )));
        }
        Err(e) => return Err(e).at(path, "reading the format version"),
    };
    let version = meta
        .get(KEY_FORMAT_VERSION)
        .at(path, "reading the format version")?
        .map(|guard| guard.value());
    match version {
        Some(found) if (OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&found) => Ok(false),
        Some(found) if found > FORMAT_VERSION => Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        }),
        Some(found) => Err(StoreError::Corrupt(format!(
            "{}: unknown format version {found}",
            path.display()
        ))),
        None => Err(StoreError::Corrupt(format!(
            "{}: the meta table has no format version",
            path.display()
        ))),
    }
}

/// Marks a directory of an older readable format with [`FORMAT_VERSION`], durably (after its
/// log is replayed: the ops of a log an older Herald wrote are all still understood).
fn upgrade_format(db: &Database, path: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().at(path, "starting a write")?;
    let found = {
        let mut meta = txn.open_table(META).at(path, "opening table meta")?;
        let found = meta
            .get(KEY_FORMAT_VERSION)
            .at(path, "reading the format version")?
            .map(|guard| guard.value());
        if found != Some(FORMAT_VERSION) {
            meta.insert(KEY_FORMAT_VERSION, FORMAT_VERSION)
                .at(path, "writing the format version")?;
        }
        found
    };
    if found == Some(FORMAT_VERSION) {
        txn.abort().at(path, "ending a read")?;
        return Ok(());
    }
    txn.commit().at(path, "upgrading the format version")?;
    info!(path = %path.display(), from = ?found, to = FORMAT_VERSION, "store format upgraded");
    Ok(())
}

/// Creates every table and writes the format version, durably.
fn initialize(db: &Database, path: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().at(path, "starting a write")?;
    {
        let mut tables = Tables::open(&txn, path)?;
        tables
            .meta
            .insert(KEY_FORMAT_VERSION, FORMAT_VERSION)
            .at(path, "writing the format version")?;
    }
    txn.commit().at(path, "creating the tables")?;
    info!(path = %path.display(), version = FORMAT_VERSION, "created a new store");
    Ok(())
}

/// Creates, durably, the tables that a store written by an earlier Herald (before presence,
/// tokens and credentials, or the QoS 2 tables) does not have yet. Existing tables and their data are left as they are.
fn add_missing_tables(db: &Database, path: &Path) -> Result<(), StoreError> {
    let existing: BTreeSet<String> = db
        .begin_read()
        .at(path, "reading")?
        .list_tables()
        .at(path, "listing tables")?
        .map(|table| table.name().to_owned())
        .collect();
    let all = [
        META.name(),
        SESSIONS.name(),
        QUEUE.name(),
        RETAINED.name(),
        CLIENT_SEQS.name(),
        CHANNELS.name(),
        OUTBOX.name(),
        HISTORY.name(),
        TOKENS.name(),
        CREDENTIALS.name(),
        INCOMING_QOS2.name(),
        RELEASED.name(),
    ];
    let missing: Vec<&str> = all
        .into_iter()
        .filter(|name| !existing.contains(*name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let txn = db.begin_write().at(path, "starting a write")?;
    Tables::open(&txn, path)?;
    txn.commit().at(path, "creating the missing tables")?;
    info!(path = %path.display(), ?missing, "created the tables this store did not have yet");
    Ok(())
}

/// Replays the complete records of the write-ahead log into the database in one durable
/// commit. Returns the log's generation.
fn replay_log(db: &Database, db_path: &Path, log: Recovered) -> Result<u64, StoreError> {
    if log.ignored_bytes > 0 {
        warn!(
            path = %log.path.display(),
            ignored_bytes = log.ignored_bytes,
            "ignored the torn or unsynced tail of the write-ahead log (it was never flushed)"
        );
    }
    if log.records.is_empty() {
        return Ok(log.generation);
    }
    let mut ops = Vec::new();
    for (index, record) in log.records.iter().enumerate() {
        let batch = codec::decode_batch(record).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: record {index} passed its checksum but does not decode: {e}",
                log.path.display()
            ))
        })?;
        ops.extend(batch);
    }
    // Ops are idempotent, so replaying batches redb already has (say, after a crash between
    // a flush's commit and its log reset) is harmless.
    commit(db, db_path, &ops, Durability::Immediate)?;
    info!(
        path = %log.path.display(),
        batches = log.records.len(),
        ops = ops.len(),
        "replayed the write-ahead log"
    );
    Ok(log.generation)
}

/// The error for a log with batches next to a database that is missing, empty or new.
fn orphan_log(log: &Recovered, db_path: &Path) -> StoreError {
    StoreError::Corrupt(format!(
        "{} holds {} unflushed batch(es) but {} is missing or empty (was it removed?)",
        log.path.display(),
        log.records.len(),
        db_path.display()
    ))
}

fn has_bytes(path: &Path) -> Result<bool, StoreError> {
    match fs::metadata(path) {
        Ok(metadata) => Ok(metadata.len() > 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// Applies `ops` in one write transaction: all of them, or none if any step fails.
fn commit(
    db: &Database,
    path: &Path,
    ops: &[Op],
    durability: Durability,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write().at(path, "starting a write")?;
    txn.set_durability(durability)
        .at(path, "setting durability")?;
    if !ops.is_empty() {
        let mut tables = Tables::open(&txn, path)?;
        let stored = tables.counters(path)?;
        let mut counters = stored;
        for op in ops {
            tables.apply(op, path, &mut counters)?;
        }
        if counters != stored {
            tables.write_counters(path, counters)?;
        }
    }
    // An error above drops `txn`, which aborts it.
    txn.commit().at(path, "committing")
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction, path: &Path) -> Result<Self, StoreError> {
        Ok(Tables {
            meta: txn.open_table(META).at(path, "opening table meta")?,
            sessions: txn
                .open_table(SESSIONS)
                .at(path, "opening table sessions")?,
            queue: txn.open_table(QUEUE).at(path, "opening table queue")?,
            retained: txn
                .open_table(RETAINED)
                .at(path, "opening table retained")?,
            client_seqs: txn
                .open_table(CLIENT_SEQS)
                .at(path, "opening table client_seqs")?,
            channels: txn
                .open_table(CHANNELS)
                .at(path, "opening table channels")?,
            outbox: txn.open_table(OUTBOX).at(path, "opening table outbox")?,
            history: txn.open_table(HISTORY).at(path, "opening table history")?,
            tokens: txn.open_table(TOKENS).at(path, "opening table tokens")?,
            credentials: txn
                .open_table(CREDENTIALS)
                .at(path, "opening table credentials")?,
            incoming_qos2: txn
                .open_table(INCOMING_QOS2)
                .at(path, "opening table incoming_qos2")?,
            released: txn
                .open_table(RELEASED)
                .at(path, "opening table released")?,
        })
    }

    fn counters(&self, path: &Path) -> Result<Counters, StoreError> {
        let read = |key: &str| -> Result<u64, StoreError> {
            let value = self.meta.get(key).at(path, "reading a counter")?;
            Ok(value.map_or(0, |guard| guard.value()))
        };
        Ok(Counters {
            next_seq: read(KEY_NEXT_SEQ)?,
            next_outbox_id: read(KEY_NEXT_OUTBOX_ID)?,
        })
    }

    fn write_counters(&mut self, path: &Path, counters: Counters) -> Result<(), StoreError> {
        self.meta
            .insert(KEY_NEXT_SEQ, counters.next_seq)
            .at(path, "writing next_seq")?;
        self.meta
            .insert(KEY_NEXT_OUTBOX_ID, counters.next_outbox_id)
            .at(path, "writing next_outbox_id")?;
        Ok(())
    }

    /// Applies one op. The arms for MQTT state come first, then those for presence.
    fn apply(&mut self, op: &Op, path: &Path, counters: &mut Counters) -> Result<(), StoreError> {
        match op {
            Op::PutSession { client_id, record } => {
                let value = codec::encode_session(record).map_err(|e| too_large(path, &e))?;
                self.sessions
                    .insert(client_id.as_str(), value.as_slice())
                    .at(path, "writing a session")?;
            }
            Op::DeleteSession { client_id } => {
                self.sessions
                    .remove(client_id.as_str())
                    .at(path, "deleting a session")?;
                let client = client_id.as_str();
                self.queue
                    .retain_in((client, 0)..=(client, u64::MAX), |_, _| false)
                    .at(path, "deleting a session's queue")?;
                self.incoming_qos2
                    .retain_in((client, 0)..=(client, u16::MAX), |_, _| false)
                    .at(path, "deleting a session's QoS 2 ids")?;
                self.released
                    .retain_in((client, 0)..=(client, u64::MAX), |_, _| false)
                    .at(path, "deleting a session's released marks")?;
            }
            Op::PutIncomingQos2 {
                client_id,
                packet_id,
            } => {
                self.incoming_qos2
                    .insert((client_id.as_str(), *packet_id), ())
                    .at(path, "writing a QoS 2 id")?;
            }
            Op::DeleteIncomingQos2 {
                client_id,
                packet_id,
            } => {
                self.incoming_qos2
                    .remove((client_id.as_str(), *packet_id))
                    .at(path, "deleting a QoS 2 id")?;
            }
            Op::Enqueue {
                client_id,
                seq,
                message,
            } => {
                let value = codec::encode_message(message).map_err(|e| too_large(path, &e))?;
                self.queue
                    .insert((client_id.as_str(), *seq), value.as_slice())
                    .at(path, "queueing a message")?;
                counters.next_seq = counters.next_seq.max(seq.saturating_add(1));
            }
            Op::Dequeue { client_id, seq } => {
                self.queue
                    .remove((client_id.as_str(), *seq))
                    .at(path, "removing a queued message")?;
                self.released
                    .remove((client_id.as_str(), *seq))
                    .at(path, "removing a released mark")?;
            }
            Op::PutReleased { client_id, seq } => {
                self.released
                    .insert((client_id.as_str(), *seq), ())
                    .at(path, "marking a message released")?;
            }
            Op::PutRetained { message } => {
                let value = codec::encode_message(message).map_err(|e| too_large(path, &e))?;
                self.retained
                    .insert(message.topic.as_str(), value.as_slice())
                    .at(path, "writing a retained message")?;
            }
            Op::DeleteRetained { topic } => {
                self.retained
                    .remove(topic.as_str())
                    .at(path, "deleting a retained message")?;
            }
            Op::PutClientSeq { client_id, seq } => {
                self.client_seqs
                    .insert(client_id.as_str(), *seq)
                    .at(path, "writing a client's presence seq")?;
            }
            Op::PutChannel { channel_id, record } => {
                let value = codec::encode_channel(record).map_err(|e| too_large(path, &e))?;
                self.channels
                    .insert(*channel_id, value.as_slice())
                    .at(path, "recording an open channel")?;
            }
            Op::DeleteChannel { channel_id } => {
                self.channels
                    .remove(*channel_id)
                    .at(path, "deleting a channel")?;
            }
            Op::PutOutbox { sink, id, payload } => {
                let value = codec::encode_outbox_entry(payload).map_err(|e| too_large(path, &e))?;
                self.outbox
                    .insert((sink.as_str(), *id), value.as_slice())
                    .at(path, "writing an outbox entry")?;
                counters.next_outbox_id = counters.next_outbox_id.max(id.saturating_add(1));
            }
            Op::DeleteOutbox { sink, id } => {
                self.outbox
                    .remove((sink.as_str(), *id))
                    .at(path, "deleting an outbox entry")?;
            }
            Op::PutHistory {
                client_id,
                seq,
                time_ms,
                payload,
            } => {
                let value = codec::encode_history_entry(*time_ms, payload)
                    .map_err(|e| too_large(path, &e))?;
                self.history
                    .insert((client_id.as_str(), *seq), value.as_slice())
                    .at(path, "writing a history entry")?;
            }
            Op::PruneHistory {
                client_id,
                below_seq,
            } => {
                let client = client_id.as_str();
                self.history
                    .retain_in((client, 0)..(client, *below_seq), |_, _| false)
                    .at(path, "pruning a client's history")?;
            }
            Op::PutToken { token, record } => {
                let value = codec::encode_token(record).map_err(|e| too_large(path, &e))?;
                self.tokens
                    .insert(token.as_str(), value.as_slice())
                    .at(path, "writing a token")?;
            }
            Op::DeleteToken { token } => {
                self.tokens
                    .remove(token.as_str())
                    .at(path, "deleting a token")?;
            }
            Op::PutCredential { client_id, record } => {
                let value = codec::encode_credential(record).map_err(|e| too_large(path, &e))?;
                self.credentials
                    .insert(client_id.as_str(), value.as_slice())
                    .at(path, "writing a device credential")?;
            }
            Op::DeleteCredential { client_id } => {
                self.credentials
                    .remove(client_id.as_str())
                    .at(path, "deleting a device credential")?;
            }
        }
        Ok(())
    }
}

fn too_large(path: &Path, error: &TooLarge) -> StoreError {
    StoreError::Engine(format!(
        "{}: a field of {} bytes is too large to store",
        path.display(),
        error.0
    ))
}
