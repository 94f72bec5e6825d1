//! [`RedbStore`]: the [`Store`] on disk, in one redb file `herald.redb` in the data directory,
//! plus the write-ahead log `herald.wal` (see `wal`).
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
//! Durability: every batch is appended to the log first, as one record; in [`SyncMode::Always`] the
//! record is `fdatasync`ed before `apply` returns, in [`SyncMode::Interval`] the log is synced by
//! [`Store::flush`] (the caller's timer). The ops then wait in memory for a checkpoint: when
//! `CHECKPOINT_OPS` of them (or `CHECKPOINT_BYTES`) wait, or at a flush, they go to a checkpoint
//! thread, which commits them to redb in one durable transaction while the store's own thread goes
//! on logging. The database thus holds a prefix of the log's ops; in interval mode the log is
//! synced before each checkpoint, so that after a power loss the database is never ahead of the log
//! (replaying an older log over it would give a state the broker was never in). Before a read, at
//! [`Store::close`], and when the log passes `WAL_RESET_BYTES`, the store's thread waits for that
//! checkpoint and commits the rest itself; the latter two then replace the log by an empty one. A
//! failed checkpoint keeps its ops (and the log) for the next one. [`RedbStore::open`] replays the
//! log, so a crash loses nothing applied, and a directory can switch modes between runs.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use redb::{
    Builder, Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition,
    TableError, TableHandle,
};
use std::collections::BTreeSet;
use tracing::{debug, error, info, warn};

use crate::codec::{self, TooLarge};
use crate::error::EngineContext;
use crate::wal::{HEADER_LEN, Recovered, Wal};
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
/// pages checkpoints touch, and pages that fall out of it are read back from the OS page cache.
/// Every byte of it counts in the broker's resident memory (a cached 4 KiB page takes 5 KiB of
/// the allocator's), and the same CPU per connect and durable-queue rates were measured with
/// 4 MiB, 1 MiB and 512 KiB (docs/benchmarks.md), so the smallest is the default; 256 KiB cost
/// the checkpoints more reads.
pub const DEFAULT_CACHE_BYTES: usize = 512 * 1024;

/// A checkpoint is handed to the checkpoint thread when this many ops wait for the database.
/// One transaction for many small batches is where the saving is: a commit costs about as much
/// as the B-tree work of a few dozen ops, and a group commit in a connect burst holds 10-30
/// (docs/benchmarks.md).
pub(crate) const CHECKPOINT_OPS: usize = 1024;

/// ... or when their batches take this many bytes in the log (the ops are held in memory too).
const CHECKPOINT_BYTES: usize = 4 * 1024 * 1024;

/// Past this much waiting for a checkpoint (checkpoints failing, or too slow), the store's own
/// thread waits for the running one and writes the rest itself; if that fails, the batch is
/// refused (the caller withholds its acknowledgements) instead of growing the log and memory
/// further.
const PENDING_MAX_BYTES: usize = 8 * CHECKPOINT_BYTES;

/// A log that grows past this is replaced by an empty one, after the ops it holds are all in
/// the database: it bounds the log's size and the replay at start. Doing so waits for the
/// checkpoint in progress and fsyncs a few times, so it should be rare.
const WAL_RESET_BYTES: u64 = 64 * 1024 * 1024;

/// A [`Store`] in a redb database.
pub struct RedbStore {
    db: Arc<Database>,
    db_path: PathBuf,
    sync: SyncMode,
    /// The open log: every batch is appended here first.
    wal: Wal,
    /// Logged batches that are neither in the database nor with the checkpoint thread, in
    /// order, as encoded for the log (they are encoded for it anyway; the ops themselves are
    /// dropped once logged).
    pending: Pending,
    /// The thread that writes checkpoints into the database, and what it is writing.
    checkpoints: Checkpoints,
    /// [`WAL_RESET_BYTES`] (smaller in tests).
    wal_reset_bytes: u64,
    /// Set when a failed write could not be undone; see [`StoreError::Unusable`].
    unusable: bool,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.db_path)
            .field("sync", &self.sync)
            .field("pending_ops", &self.pending.ops)
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
    /// (redb otherwise keeps it at its high-water mark), then start an empty log.
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

        let generation = recovered.map_or(1, |generation| generation.wrapping_add(1));
        let wal = Wal::create(data_dir, generation)?;
        let db = Arc::new(db);
        let checkpoints = Checkpoints::new(db.clone(), db_path.clone());
        info!(path = %db_path.display(), ?sync, fresh, "store open");
        Ok(RedbStore {
            db,
            db_path,
            sync,
            wal,
            pending: Pending::default(),
            checkpoints,
            wal_reset_bytes: WAL_RESET_BYTES,
            unusable: false,
        })
    }

    /// Logs the batch (with `fdatasync` in always mode) and keeps its ops for a checkpoint,
    /// handed to the checkpoint thread when enough wait and it is free.
    fn apply_logged(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let payload = codec::encode_batch(ops).map_err(|e| too_large(&self.db_path, &e))?;
        self.collect_checkpoint(false);
        if self.unusable {
            return Err(self.unusable_error());
        }
        if self.pending.bytes >= PENDING_MAX_BYTES {
            // Checkpoints have been failing: one more try, in this thread, before the batch
            // is refused.
            self.checkpoint_now()?;
        }
        let mark = self.wal.len();
        let written = self.wal.append(&payload).and_then(|()| match self.sync {
            SyncMode::Always => self.wal.sync(),
            SyncMode::Interval { .. } => Ok(()),
        });
        if let Err(error) = written {
            // Undo the record, or a later replay would apply a batch reported as failed.
            if let Err(undo) = self.wal.truncate(mark) {
                warn!(
                    path = %self.wal.path().display(),
                    %error,
                    %undo,
                    "could not remove a failed batch from the write-ahead log"
                );
                self.unusable = true;
            } else if self.sync == SyncMode::Always
                && let Err(unsynced) = self.wal.sync()
            {
                // The record may have reached the disk before the error: until the cut is on
                // disk too, a power loss could bring the refused batch back at the next start
                // (a copy of what its client sends again, not a loss). Tried again with the
                // next batch's sync.
                warn!(
                    path = %self.wal.path().display(),
                    %error,
                    %unsynced,
                    "the removal of a failed batch from the write-ahead log is not on disk yet"
                );
            }
            return Err(error);
        }
        self.pending.push(payload, ops.len());
        if self.pending.ops >= CHECKPOINT_OPS || self.pending.bytes >= CHECKPOINT_BYTES {
            self.start_checkpoint();
        }
        if self.wal.len() > self.wal_reset_bytes {
            // The batch is in the log: a failure here is retried at the next batch.
            if let Err(error) = self.checkpoint_and_reset() {
                warn!(%error, "emptying a full write-ahead log failed");
            }
        }
        Ok(())
    }

    /// Hands the waiting ops to the checkpoint thread, unless there are none or it is busy.
    fn start_checkpoint(&mut self) {
        if self.pending.batches.is_empty() || self.checkpoints.busy() {
            return;
        }
        if let Err(error) = self.sync_log_for_checkpoint() {
            warn!(%error, "syncing the write-ahead log before a checkpoint failed; the ops wait for the next one");
            return;
        }
        let batches = std::mem::take(&mut self.pending);
        if let Err(batches) = self.checkpoints.hand_over(batches) {
            self.pending = batches;
        }
    }

    /// Takes the checkpoint thread's answer if there is one (waiting for it with `wait`). A
    /// failed checkpoint's ops go back in front of the waiting ones, to be written again.
    fn collect_checkpoint(&mut self, wait: bool) {
        let (error, mut batches) = match self.checkpoints.collect(wait) {
            Collected::Nothing | Collected::Done => return,
            Collected::Failed(error, batches) => (error, batches),
            Collected::Died => {
                // Its ops are in the log only: the log must not be emptied before a restart
                // replays it, so nothing more is written.
                error!(path = %self.db_path.display(), "the checkpoint thread ended without finishing its checkpoint; the store stops taking writes until a restart replays its log");
                self.unusable = true;
                return;
            }
        };
        warn!(%error, ops = batches.ops, "a checkpoint of the write-ahead log into the database failed; the ops stay in the log and are written again at the next one");
        batches.append(std::mem::take(&mut self.pending));
        self.pending = batches;
    }

    /// In interval mode, syncs the log ahead of a (durable) checkpoint: the database must never
    /// hold ops that a power loss could take from the log, since replaying an older log over a
    /// newer database would give a state the broker was never in.
    fn sync_log_for_checkpoint(&mut self) -> Result<(), StoreError> {
        match self.sync {
            SyncMode::Always => Ok(()),
            SyncMode::Interval { .. } => self.wal.sync(),
        }
    }

    /// Writes every op of the log into the database, in this thread, after the checkpoint
    /// thread's current one. On error the ops stay waiting; a store made unusable refuses.
    /// Every read runs it first, so that it reads everything applied.
    fn checkpoint_now(&mut self) -> Result<(), StoreError> {
        self.collect_checkpoint(true);
        if self.unusable {
            return Err(self.unusable_error());
        }
        if self.pending.batches.is_empty() {
            return Ok(());
        }
        self.sync_log_for_checkpoint()?;
        self.pending.commit(&self.db, &self.db_path)?;
        self.pending = Pending::default();
        Ok(())
    }

    /// Every op in the database, durably, then an empty log.
    fn checkpoint_and_reset(&mut self) -> Result<(), StoreError> {
        self.checkpoint_now()?;
        if self.wal.len() > HEADER_LEN {
            self.wal.reset()?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn set_wal_reset_bytes(&mut self, bytes: u64) {
        self.wal_reset_bytes = bytes;
    }

    fn unusable_error(&self) -> StoreError {
        StoreError::Unusable {
            path: self.db_path.clone(),
        }
    }
}

impl Store for RedbStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.checkpoint_now()?;
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
        if let SyncMode::Interval { .. } = self.sync {
            // The log holds every batch since it was last emptied, and the database every one
            // before: with the log on disk, everything applied survives a power loss.
            self.wal.sync()?;
        }
        // Ops that wait for a checkpoint go to the checkpoint thread now, when it is free:
        // a quiet broker holds none in memory for long.
        self.collect_checkpoint(false);
        if self.unusable {
            return Err(self.unusable_error());
        }
        self.start_checkpoint();
        Ok(())
    }

    fn close(&mut self) -> Result<(), StoreError> {
        self.checkpoint_and_reset()
    }

    fn history(
        &mut self,
        client_id: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64, bytes::Bytes)>, StoreError> {
        self.checkpoint_now()?;
        redb_read::history(&self.db, &self.db_path, client_id, from_ms..=to_ms, limit)
    }

    fn history_entries(
        &mut self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<Option<bytes::Bytes>>, StoreError> {
        self.checkpoint_now()?;
        redb_read::history_entries(&self.db, &self.db_path, wanted)
    }

    fn last_events(&mut self, each: &mut crate::OnLastEvent<'_>) -> Result<(), StoreError> {
        self.checkpoint_now()?;
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
    let ops = decode_records(&log.records, &log.path)?;
    // Ops are idempotent, so replaying batches redb already has (every one checkpointed since
    // the log was last emptied) is harmless.
    commit(db, db_path, &ops, Durability::Immediate)?;
    info!(
        path = %log.path.display(),
        batches = log.records.len(),
        ops = ops.len(),
        "replayed the write-ahead log"
    );
    Ok(log.generation)
}

/// The ops of logged records (batches as `codec` encodes them), in order. A record that does
/// not decode passed the log's checksum, so the file (or this Herald) is broken.
fn decode_records(records: &[Vec<u8>], log_path: &Path) -> Result<Vec<Op>, StoreError> {
    let mut ops = Vec::new();
    for (index, record) in records.iter().enumerate() {
        ops.extend(codec::decode_batch(record).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: record {index} passed its checksum but does not decode: {e}",
                log_path.display()
            ))
        })?);
    }
    Ok(ops)
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

/// Logged batches waiting for a checkpoint, encoded as in the log.
#[derive(Default)]
struct Pending {
    batches: Vec<Vec<u8>>,
    ops: usize,
    bytes: usize,
}

impl Pending {
    fn push(&mut self, batch: Vec<u8>, ops: usize) {
        self.bytes += batch.len();
        self.ops += ops;
        self.batches.push(batch);
    }

    /// `later`'s batches after these.
    fn append(&mut self, mut later: Pending) {
        self.batches.append(&mut later.batches);
        self.ops += later.ops;
        self.bytes += later.bytes;
    }

    /// Decodes the batches and commits their ops in one durable transaction.
    fn commit(&self, db: &Database, path: &Path) -> Result<(), StoreError> {
        commit(
            db,
            path,
            &decode_records(&self.batches, path)?,
            Durability::Immediate,
        )
    }
}

/// What the checkpoint thread answers: done, or the error with the batches it was given.
type CheckpointResult = Result<(), (StoreError, Pending)>;

/// What [`Checkpoints::collect`] found.
enum Collected {
    /// No checkpoint running, or it is still running (and was not waited for).
    Nothing,
    /// The checkpoint is in the database.
    Done,
    /// It failed: its batches, to be written again.
    Failed(StoreError, Pending),
    /// Its thread ended without an answer (it panicked).
    Died,
}

/// The checkpoint thread: it writes the ops of logged batches into the database in one durable
/// transaction, while the store's own thread goes on logging new batches. One checkpoint at a
/// time, each in a thread of its own that ends with it: an idle thread would keep the
/// allocator's per-thread cache of what the checkpoint freed (about a megabyte after a connect
/// burst), and a thread costs tens of microseconds against the milliseconds of a checkpoint.
/// redb has one writer at a time; the store's own thread writes only after it has collected
/// the checkpoint's answer.
struct Checkpoints {
    db: Arc<Database>,
    db_path: PathBuf,
    running: Option<JoinHandle<CheckpointResult>>,
}

impl Checkpoints {
    fn new(db: Arc<Database>, db_path: PathBuf) -> Checkpoints {
        Checkpoints {
            db,
            db_path,
            running: None,
        }
    }

    fn busy(&self) -> bool {
        self.running.is_some()
    }

    /// Starts a checkpoint of `batches`, or gives them back if no thread can be started.
    fn hand_over(&mut self, batches: Pending) -> Result<(), Pending> {
        let db = self.db.clone();
        let db_path = self.db_path.clone();
        // The batches move into the thread only once it runs: a failed spawn drops its closure,
        // so they are kept here until then.
        let (give, take) = mpsc::sync_channel::<Pending>(1);
        let spawned = std::thread::Builder::new()
            .name("herald-checkpoint".into())
            .spawn(move || {
                let batches = take.recv().unwrap_or_default();
                batches
                    .commit(&db, &db_path)
                    .map_err(|error| (error, batches))
            });
        match spawned {
            Ok(thread) => {
                // The receiver lives until the thread has taken the batches.
                let _ = give.send(batches);
                self.running = Some(thread);
                Ok(())
            }
            Err(error) => {
                warn!(%error, "could not start a checkpoint thread; the ops wait for the next checkpoint");
                Err(batches)
            }
        }
    }

    /// The answer of the running checkpoint, if it is done (or once it is, with `wait`).
    fn collect(&mut self, wait: bool) -> Collected {
        let Some(thread) = self.running.take_if(|thread| wait || thread.is_finished()) else {
            return Collected::Nothing;
        };
        match thread.join() {
            Ok(Ok(())) => Collected::Done,
            Ok(Err((error, batches))) => Collected::Failed(error, batches),
            Err(_) => Collected::Died,
        }
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        // The database stays open until a checkpoint in progress has ended.
        if let Some(thread) = self.running.take() {
            let _ = thread.join();
        }
    }
}

fn too_large(path: &Path, error: &TooLarge) -> StoreError {
    StoreError::Engine(format!(
        "{}: a field of {} bytes is too large to store",
        path.display(),
        error.0
    ))
}
