//! Tests of what only [`RedbStore`] on a disk can show: restarts in both sync modes, a process
//! crash in interval mode, a torn log, and files that are newer, foreign or corrupt.
//!
//! A crash is a real one: the test binary runs itself as a child process (the `crash_child`
//! test, which does nothing unless [`CRASH_DIR_ENV`] is set) that opens a store, applies batches
//! and calls `std::process::exit` without flushing or dropping anything. The parent then opens
//! the directory the child left behind.

use std::fs;
use std::path::Path;
use std::process::Command;

use redb::{Database, ReadableDatabase, TableDefinition};
use tempfile::TempDir;

use crate::conformance::{enqueue, message, mixed_batch, mixed_snapshot, session};
use crate::redb_store::{DB_FILE, KEY_FORMAT_VERSION, META, SESSIONS};
use crate::wal::{HEADER_LEN, WAL_FILE};
use crate::{FORMAT_VERSION, Op, RedbStore, Snapshot, Store, StoreError, SyncMode};

const INTERVAL: SyncMode = SyncMode::Interval { millis: 1000 };
const CRASH_DIR_ENV: &str = "HERALD_STORE_CRASH_CHILD_DIR";
const CRASH_BATCHES_ENV: &str = "HERALD_STORE_CRASH_CHILD_BATCHES";
const CRASH_EXIT_CODE: i32 = 42;

pub(crate) fn fresh_redb(sync: SyncMode) -> (RedbStore, TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(dir.path(), sync).expect("open");
    (store, dir)
}

fn reopen(dir: &Path, sync: SyncMode) -> Snapshot {
    RedbStore::open(dir, sync)
        .expect("reopen")
        .load()
        .expect("load")
}

fn open_error(dir: &Path, sync: SyncMode) -> StoreError {
    RedbStore::open(dir, sync).expect_err("open must fail")
}

fn assert_names(error: &StoreError, path: &Path) {
    let shown = error.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
}

/// Batch `i` of the crash child.
fn crash_batch(i: u64) -> Vec<Op> {
    vec![
        Op::PutSession {
            client_id: format!("s{i}"),
            record: session(&["t/#"]),
        },
        enqueue("c", i, &format!("m{i}")),
        Op::PutRetained {
            message: message(&format!("r/{i}"), "kept"),
        },
    ]
}

fn crash_snapshot(batches: u64) -> Snapshot {
    let mut store = crate::MemoryStore::new();
    for i in 0..batches {
        store.apply(&crash_batch(i)).expect("apply");
    }
    store.load().expect("load")
}

/// The child half of [`crash_after`]: a no-op in a normal test run.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let batches: u64 = std::env::var(CRASH_BATCHES_ENV)
        .expect("batch count")
        .parse()
        .expect("a number");
    let mut store = RedbStore::open(Path::new(&dir), INTERVAL).expect("open");
    for i in 0..batches {
        store.apply(&crash_batch(i)).expect("apply");
    }
    // No flush, no Drop: what a kill -9 leaves, as far as this store is concerned.
    std::process::exit(CRASH_EXIT_CODE);
}

/// Runs a child process that applies `batches` crash batches in interval mode to `dir`, then
/// dies without flushing.
fn crash_after(dir: &Path, batches: u64) {
    let test_name = format!(
        "{}::crash_child",
        module_path!().split_once("::").map_or("", |(_, rest)| rest)
    );
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args([test_name.as_str(), "--exact", "--test-threads=1", "--quiet"])
        .env(CRASH_DIR_ENV, dir)
        .env(CRASH_BATCHES_ENV, batches.to_string())
        .status()
        .expect("run the crash child");
    assert_eq!(status.code(), Some(CRASH_EXIT_CODE), "child: {status}");
}

#[test]
fn restart_keeps_data_in_both_modes() {
    for sync in [SyncMode::Always, INTERVAL] {
        let (mut store, dir) = fresh_redb(sync);
        store.apply(&mixed_batch()).expect("apply");
        drop(store);
        assert_eq!(reopen(dir.path(), sync), mixed_snapshot(), "{sync:?}");
        // And again, after a restart that changed nothing.
        assert_eq!(reopen(dir.path(), sync), mixed_snapshot(), "{sync:?}");
    }
}

#[test]
fn interval_mode_survives_a_process_crash_without_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 3);
    assert_eq!(reopen(dir.path(), INTERVAL), crash_snapshot(3));
    // The replay was committed durably and the log emptied: a second crash-free restart agrees.
    assert_eq!(
        fs::metadata(dir.path().join(WAL_FILE)).expect("log").len(),
        HEADER_LEN
    );
    assert_eq!(reopen(dir.path(), INTERVAL), crash_snapshot(3));
}

#[test]
fn without_the_log_a_crash_loses_unflushed_batches() {
    // Shows the crash tests above test the log: redb alone drops Durability::None commits.
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    fs::remove_file(dir.path().join(WAL_FILE)).expect("remove log");
    assert_eq!(reopen(dir.path(), INTERVAL), Snapshot::default());
}

#[test]
fn a_torn_log_tail_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    let bytes = fs::read(log_in(dir.path())).expect("read log");
    fs::write(log_in(dir.path()), &bytes[..bytes.len() - 3]).expect("tear the last record");
    assert_eq!(reopen(dir.path(), INTERVAL), crash_snapshot(1));

    // Garbage after complete records (a power loss's unsynced blocks) is ignored the same way.
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    let mut bytes = fs::read(log_in(dir.path())).expect("read log");
    bytes.extend_from_slice(&[0xAB; 100]);
    fs::write(log_in(dir.path()), &bytes).expect("append garbage");
    assert_eq!(reopen(dir.path(), INTERVAL), crash_snapshot(2));
}

fn log_in(dir: &Path) -> std::path::PathBuf {
    dir.join(WAL_FILE)
}

#[test]
fn always_mode_replays_a_log_left_by_interval_mode_and_removes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    assert_eq!(reopen(dir.path(), SyncMode::Always), crash_snapshot(2));
    assert!(!log_in(dir.path()).exists());
}

#[test]
fn flush_makes_the_log_empty() {
    let (mut store, dir) = fresh_redb(INTERVAL);
    store.apply(&mixed_batch()).expect("apply");
    assert!(fs::metadata(log_in(dir.path())).expect("log").len() > HEADER_LEN);
    store.flush().expect("flush");
    assert_eq!(
        fs::metadata(log_in(dir.path())).expect("log").len(),
        HEADER_LEN
    );
    drop(store);
    assert_eq!(reopen(dir.path(), INTERVAL), mixed_snapshot());

    let (_store, dir) = fresh_redb(SyncMode::Always);
    assert!(!log_in(dir.path()).exists(), "always mode keeps no log");
}

#[test]
fn a_missing_database_with_a_log_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 1);
    fs::remove_file(dir.path().join(DB_FILE)).expect("remove database");
    let error = open_error(dir.path(), INTERVAL);
    assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
    assert_names(&error, &log_in(dir.path()));
    assert!(log_in(dir.path()).exists(), "the log is left alone");
    assert!(
        !dir.path().join(DB_FILE).exists(),
        "no new database was created"
    );
}

#[test]
fn a_newer_format_is_refused() {
    let (store, dir) = fresh_redb(SyncMode::Always);
    drop(store);
    let db_path = dir.path().join(DB_FILE);
    let db = Database::create(&db_path).expect("raw open");
    let txn = db.begin_write().expect("write");
    txn.open_table(META)
        .expect("meta")
        .insert(KEY_FORMAT_VERSION, FORMAT_VERSION + 1)
        .expect("insert");
    txn.commit().expect("commit");
    drop(db);

    let error = open_error(dir.path(), SyncMode::Always);
    assert!(
        matches!(
            error,
            StoreError::NewerFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{error}"
    );
    assert_names(&error, &db_path);
}

#[test]
fn a_garbage_file_is_refused_and_left_untouched() {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let long: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    for garbage in [b"hello, not a database".to_vec(), long] {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join(DB_FILE);
        fs::write(&db_path, &garbage).expect("write garbage");
        for sync in [SyncMode::Always, INTERVAL] {
            let error = open_error(dir.path(), sync);
            assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
            assert_names(&error, &db_path);
        }
        assert_eq!(fs::read(&db_path).expect("read"), garbage, "never reset");
    }
}

#[test]
fn a_foreign_redb_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = dir.path().join(DB_FILE);
    let db = Database::create(&db_path).expect("raw create");
    let txn = db.begin_write().expect("write");
    let other: TableDefinition<u64, u64> = TableDefinition::new("other");
    txn.open_table(other)
        .expect("table")
        .insert(1, 2)
        .expect("insert");
    txn.commit().expect("commit");
    drop(db);
    let error = open_error(dir.path(), SyncMode::Always);
    assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
    assert_names(&error, &db_path);
}

#[test]
fn an_undecodable_value_is_an_error_not_a_panic() {
    let (store, dir) = fresh_redb(SyncMode::Always);
    drop(store);
    let db_path = dir.path().join(DB_FILE);
    let db = Database::create(&db_path).expect("raw open");
    let txn = db.begin_write().expect("write");
    txn.open_table(SESSIONS)
        .expect("sessions")
        .insert("broken", [1_u8, 0, 0].as_slice())
        .expect("insert");
    txn.commit().expect("commit");
    drop(db);

    let mut store = RedbStore::open(dir.path(), SyncMode::Always).expect("open");
    let error = store.load().expect_err("load must fail");
    assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
    assert_names(&error, &db_path);
    assert!(error.to_string().contains("broken"), "{error}");
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let (_store, dir) = fresh_redb(SyncMode::Always);
    let error = open_error(dir.path(), SyncMode::Always);
    assert!(matches!(error, StoreError::Engine(_)), "{error}");
    assert_names(&error, &dir.path().join(DB_FILE));
}

#[test]
fn open_compacts_the_file() {
    let (mut store, dir) = fresh_redb(SyncMode::Always);
    let payload = "x".repeat(16 * 1024);
    let ops: Vec<Op> = (0..128).map(|seq| enqueue("c", seq, &payload)).collect();
    store.apply(&ops).expect("apply");
    store
        .apply(&[Op::DeleteSession {
            client_id: "c".into(),
        }])
        .expect("delete");
    drop(store);
    let db_path = dir.path().join(DB_FILE);
    let before = fs::metadata(&db_path).expect("stat").len();
    let snapshot = reopen(dir.path(), SyncMode::Always);
    let after = fs::metadata(&db_path).expect("stat").len();
    assert!(after * 2 < before, "{before} bytes before, {after} after");
    assert_eq!(snapshot.next_seq, 128);
    assert!(snapshot.queues.is_empty());
}

#[test]
fn a_new_store_records_its_format_version() {
    let (store, dir) = fresh_redb(SyncMode::Always);
    drop(store);
    let db = Database::create(dir.path().join(DB_FILE)).expect("raw open");
    let txn = db.begin_read().expect("read");
    let meta = txn.open_table(META).expect("meta");
    let version = meta
        .get(KEY_FORMAT_VERSION)
        .expect("get")
        .map(|v| v.value());
    assert_eq!(version, Some(FORMAT_VERSION));
}
