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

use redb::{Database, ReadableDatabase, TableDefinition, TableHandle};
use tempfile::TempDir;

use crate::codec;
use crate::conformance::{
    assert_mixed_history, channel, enqueue, full_history, message, mixed_batch, mixed_snapshot,
    put_history, put_outbox, session,
};
use crate::redb_store::{
    CHANNELS, CHECKPOINT_OPS, CLIENT_SEQS, CREDENTIALS, DB_FILE, HISTORY, INCOMING_QOS2,
    KEY_FORMAT_VERSION, KEY_NEXT_SEQ, META, OUTBOX, QUEUE, RELEASED, RETAINED, SESSIONS, TOKENS,
};
use crate::wal::{HEADER_LEN, WAL_FILE};
use crate::{FORMAT_VERSION, MemoryStore, Op, RedbStore, Snapshot, Store, StoreError, SyncMode};

const INTERVAL: SyncMode = SyncMode::Interval { millis: 1000 };
const CRASH_DIR_ENV: &str = "HERALD_STORE_CRASH_CHILD_DIR";
const CRASH_BATCHES_ENV: &str = "HERALD_STORE_CRASH_CHILD_BATCHES";
const CRASH_ALWAYS_ENV: &str = "HERALD_STORE_CRASH_CHILD_ALWAYS";
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

/// The whole history of `client` after reopening `dir`.
fn reopen_history(dir: &Path, sync: SyncMode, client: &str) -> Vec<(u64, u64, bytes::Bytes)> {
    full_history(&mut RedbStore::open(dir, sync).expect("reopen"), client)
}

fn open_error(dir: &Path, sync: SyncMode) -> StoreError {
    RedbStore::open(dir, sync).expect_err("open must fail")
}

fn assert_names(error: &StoreError, path: &Path) {
    let shown = error.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
}

/// Batch `i` of the crash child: every kind of op but the deletes of sessions and retained
/// messages, some undoing part of batch `i - 1`.
fn crash_batch(i: u64) -> Vec<Op> {
    vec![
        Op::PutSession {
            client_id: format!("s{i}"),
            record: session(&["t/#"]),
        },
        enqueue("c", i, &format!("m{i}")),
        Op::Dequeue {
            client_id: "c".into(),
            seq: i.wrapping_sub(2),
        },
        Op::PutRetained {
            message: message(&format!("r/{i}"), "kept"),
        },
        Op::PutClientSeq {
            client_id: "c".into(),
            seq: 10 * i,
        },
        Op::PutChannel {
            channel_id: u128::from(i) << 64,
            record: channel("c", &format!("channel {i}")),
        },
        Op::DeleteChannel {
            channel_id: u128::from(i.wrapping_sub(1)) << 64,
        },
        put_outbox("hook", 2 * i, &format!("hook {i}")),
        put_outbox("hook2", 2 * i + 1, &format!("hook2 {i}")),
        Op::DeleteOutbox {
            sink: "hook".into(),
            id: (2 * i).wrapping_sub(2),
        },
        put_history("c", i, 1000 + i, &format!("event {i}")),
        Op::PruneHistory {
            client_id: "c".into(),
            below_seq: i.saturating_sub(1),
        },
    ]
}

/// What the first `batches` crash batches leave: the snapshot and the history of "c".
fn crash_state(batches: u64) -> (Snapshot, Vec<(u64, u64, bytes::Bytes)>) {
    let mut store = MemoryStore::new();
    for i in 0..batches {
        store.apply(&crash_batch(i)).expect("apply");
    }
    (store.load().expect("load"), full_history(&mut store, "c"))
}

/// The seqs of every queued message in `dir`, reopened in always mode, in key order.
fn queued_after_reopen(dir: &Path) -> Vec<u64> {
    reopen(dir, SyncMode::Always)
        .queues
        .iter()
        .flat_map(|(_, queue)| queue.iter().map(|(seq, _)| *seq))
        .collect()
}

/// Asserts that `dir`, reopened, holds what the first `batches` crash batches leave.
fn assert_crash_state(dir: &Path, sync: SyncMode, batches: u64) {
    let (snapshot, history) = crash_state(batches);
    let mut store = RedbStore::open(dir, sync).expect("reopen");
    assert_eq!(store.load().expect("load"), snapshot);
    assert_eq!(full_history(&mut store, "c"), history);
}

/// The name the test binary knows the child test `name` of this module by.
fn child_test_name(name: &str) -> String {
    format!(
        "{}::{name}",
        module_path!().split_once("::").map_or("", |(_, rest)| rest)
    )
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
    let sync = if std::env::var_os(CRASH_ALWAYS_ENV).is_some() {
        SyncMode::Always
    } else {
        INTERVAL
    };
    let mut store = RedbStore::open(Path::new(&dir), sync).expect("open");
    for i in 0..batches {
        store.apply(&crash_batch(i)).expect("apply");
    }
    // No flush, no Drop: what a kill -9 leaves, as far as this store is concerned.
    std::process::exit(CRASH_EXIT_CODE);
}

/// Runs a child process that applies `batches` crash batches in interval mode to `dir`, then
/// dies without flushing.
fn crash_after(dir: &Path, batches: u64) {
    crash_after_in(dir, INTERVAL, batches);
}

/// [`crash_after`] with the child's store in `sync` mode.
fn crash_after_in(dir: &Path, sync: SyncMode, batches: u64) {
    let test_name = child_test_name("crash_child");
    let mut child = Command::new(std::env::current_exe().expect("test binary"));
    child
        .args([test_name.as_str(), "--exact", "--test-threads=1", "--quiet"])
        .env(CRASH_DIR_ENV, dir)
        .env(CRASH_BATCHES_ENV, batches.to_string());
    if sync == SyncMode::Always {
        child.env(CRASH_ALWAYS_ENV, "1");
    }
    let status = child.status().expect("run the crash child");
    assert_eq!(status.code(), Some(CRASH_EXIT_CODE), "child: {status}");
}

const FULL_DISK_DIR_ENV: &str = "HERALD_STORE_FULL_DISK_CHILD_DIR";
/// The child's file size limit: the log's first 3 MiB (it grows 1 MiB at a time).
#[cfg(target_os = "linux")]
const FULL_DISK_LIMIT: u64 = 3 * 1024 * 1024;
const FULL_DISK_EXIT_CODE: i32 = 43;

/// The child half of [`a_full_disk_refuses_the_batch_and_keeps_every_acknowledged_one`], run
/// with a file size limit: a no-op in a normal test run. Applies 256 KiB batches until the log
/// cannot grow, then a small one that fits, and says which were acknowledged.
#[test]
fn full_disk_child() {
    let Some(dir) = std::env::var_os(FULL_DISK_DIR_ENV) else {
        return;
    };
    let mut store = RedbStore::open(Path::new(&dir), SyncMode::Always).expect("open");
    let big = "x".repeat(256 * 1024);
    let mut acked = Vec::new();
    let mut refused = 0;
    for seq in 0..40 {
        match store.apply(&[enqueue("c", seq, &big)]) {
            Ok(()) => acked.push(seq),
            Err(error) => {
                println!("ERROR {error}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    }
    if store.apply(&[enqueue("c", 1000, "small")]).is_ok() {
        acked.push(1000);
    }
    println!("ACKED {acked:?}");
    // No flush, no Drop: the process ends as a crash would end it.
    std::process::exit(FULL_DISK_EXIT_CODE);
}

/// A disk that fills up (here: a file size limit on the process, `prlimit --fsize` from
/// util-linux, with SIGXFSZ ignored so that the write fails with EFBIG instead of killing it):
/// the batch that does not fit is refused with an error naming the log, later batches that fit
/// are taken, and after a crash and a restart with room again the store holds exactly the
/// acknowledged batches, none of the refused ones. (The limit covers the database file too; it
/// stays small because the child's 2.8 MiB of batches start no checkpoint, which takes 4 MiB.)
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_refuses_the_batch_and_keeps_every_acknowledged_one() {
    assert!(
        Command::new("prlimit")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "this test needs `prlimit` (Debian: util-linux)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let test_name = child_test_name("full_disk_child");
    let exe = std::env::current_exe().expect("test binary");
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; exec prlimit --fsize={FULL_DISK_LIMIT} -- \"$@\""
        ))
        .arg("sh")
        .arg(&exe)
        .args([
            test_name.as_str(),
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(FULL_DISK_DIR_ENV, dir.path())
        .output()
        .expect("run the full-disk child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(FULL_DISK_EXIT_CODE),
        "child: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // (The test harness's own output may share a line with the child's.)
    let errors: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.find("ERROR ").map(|at| &l[at..]))
        .collect();
    assert_eq!(errors.len(), 3, "{stdout}");
    let log = dir.path().join(WAL_FILE).display().to_string();
    assert!(errors.iter().all(|e| e.contains(&log)), "{errors:?}");
    let acked: Vec<u64> = stdout
        .lines()
        .find_map(|l| l.find("ACKED ").map(|at| &l[at + "ACKED ".len()..]))
        .expect("the child's acknowledged batches")
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("not a seq: {n:?} in {stdout}"))
        })
        .collect();
    // Most of the 3 MiB took batches; the small one fitted after the refusals.
    assert!(acked.len() >= 8, "{acked:?}");
    assert_eq!(acked.last(), Some(&1000), "{acked:?}");
    assert_eq!(queued_after_reopen(dir.path()), acked);
    // With room again, the store takes batches as before.
    let mut store = RedbStore::open(dir.path(), SyncMode::Always).expect("reopen");
    store
        .apply(&[enqueue("c", 2000, "after")])
        .expect("apply with room");
}

#[test]
fn restart_keeps_data_in_both_modes() {
    for sync in [SyncMode::Always, INTERVAL] {
        let (mut store, dir) = fresh_redb(sync);
        store.apply(&mixed_batch()).expect("apply");
        drop(store);
        assert_eq!(reopen(dir.path(), sync), mixed_snapshot(), "{sync:?}");
        // And again, after a restart that changed nothing.
        let mut store = RedbStore::open(dir.path(), sync).expect("reopen");
        assert_eq!(store.load().expect("load"), mixed_snapshot(), "{sync:?}");
        assert_mixed_history(&mut store);
    }
}

#[test]
fn interval_mode_survives_a_process_crash_without_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 3);
    assert_crash_state(dir.path(), INTERVAL, 3);
    // The replay was committed durably and the log emptied: a second crash-free restart agrees.
    assert_eq!(
        fs::metadata(dir.path().join(WAL_FILE)).expect("log").len(),
        HEADER_LEN
    );
    assert_crash_state(dir.path(), INTERVAL, 3);
}

#[test]
fn the_crash_batches_use_every_presence_op() {
    let (snapshot, history) = crash_state(3);
    assert_eq!(snapshot.client_seqs, [("c".to_owned(), 20)]);
    assert_eq!(snapshot.channels, [(2 << 64, channel("c", "channel 2"))]);
    let ids: Vec<(&str, Vec<u64>)> = snapshot
        .outboxes
        .iter()
        .map(|(sink, entries)| (sink.as_str(), entries.iter().map(|(id, _)| *id).collect()))
        .collect();
    assert_eq!(ids, [("hook", vec![4]), ("hook2", vec![1, 3, 5])]);
    assert_eq!(snapshot.next_outbox_id, 6);
    let seqs: Vec<u64> = history.iter().map(|(seq, _, _)| *seq).collect();
    assert_eq!(seqs, [1, 2]);
}

#[test]
fn without_the_log_a_crash_loses_unflushed_batches() {
    // Shows the crash tests above test the log: redb alone drops Durability::None commits.
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    fs::remove_file(dir.path().join(WAL_FILE)).expect("remove log");
    assert_eq!(reopen(dir.path(), INTERVAL), Snapshot::default());
    assert_eq!(reopen_history(dir.path(), INTERVAL, "c"), []);
}

#[test]
fn a_torn_log_tail_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    let bytes = fs::read(log_in(dir.path())).expect("read log");
    // The log's records end before the zeros it was extended with.
    let end = bytes
        .iter()
        .rposition(|&byte| byte != 0)
        .map_or(0, |i| i + 1);
    fs::write(log_in(dir.path()), &bytes[..end - 3]).expect("tear the last record");
    assert_crash_state(dir.path(), INTERVAL, 1);

    // Garbage after complete records (a power loss's unsynced blocks) is ignored the same way.
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    let mut bytes = fs::read(log_in(dir.path())).expect("read log");
    bytes.extend_from_slice(&[0xAB; 100]);
    fs::write(log_in(dir.path()), &bytes).expect("append garbage");
    assert_crash_state(dir.path(), INTERVAL, 2);
}

fn log_in(dir: &Path) -> std::path::PathBuf {
    dir.join(WAL_FILE)
}

#[test]
fn always_mode_replays_a_log_left_by_interval_mode_and_starts_an_empty_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after(dir.path(), 2);
    assert_crash_state(dir.path(), SyncMode::Always, 2);
    assert_eq!(log_len(dir.path()), HEADER_LEN);
}

/// Batches of more ops than several checkpoints take: the process ends with ops in the log
/// only, and maybe with a checkpoint half written by the checkpoint thread.
const PAST_CHECKPOINTS: u64 = 4 * CHECKPOINT_OPS as u64 / 8;

#[test]
fn a_crash_in_always_mode_loses_no_applied_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after_in(dir.path(), SyncMode::Always, PAST_CHECKPOINTS);
    assert!(log_len(dir.path()) > HEADER_LEN, "the child left its log");
    assert_crash_state(dir.path(), SyncMode::Always, PAST_CHECKPOINTS);
    // The same in interval mode, with its log unsynced (a process crash, not a power loss).
    let dir = tempfile::tempdir().expect("tempdir");
    crash_after_in(dir.path(), INTERVAL, PAST_CHECKPOINTS);
    assert_crash_state(dir.path(), INTERVAL, PAST_CHECKPOINTS);
}

#[test]
fn reads_see_batches_the_checkpoint_thread_has_or_has_not_written() {
    for sync in [SyncMode::Always, INTERVAL] {
        let (mut store, dir) = fresh_redb(sync);
        let (snapshot, history) = crash_state(PAST_CHECKPOINTS);
        for i in 0..PAST_CHECKPOINTS {
            store.apply(&crash_batch(i)).expect("apply");
            if i % 50 == 0 {
                // A read in the middle waits for the checkpoint thread and writes the rest.
                let read = full_history(&mut store, "c");
                assert_eq!(read.last().map(|(seq, _, _)| *seq), Some(i), "{sync:?}");
            }
        }
        assert_eq!(store.load().expect("load"), snapshot, "{sync:?}");
        assert_eq!(full_history(&mut store, "c"), history, "{sync:?}");
        store.close().expect("close");
        assert_eq!(log_len(dir.path()), HEADER_LEN, "{sync:?}");
        drop(store);
        assert_crash_state(dir.path(), sync, PAST_CHECKPOINTS);
    }
}

#[test]
fn a_log_past_its_reset_size_is_emptied_as_batches_come() {
    const RESET: u64 = 2 * 1024 * 1024;
    let (mut store, dir) = fresh_redb(SyncMode::Always);
    store.set_wal_reset_bytes(RESET);
    let big = "x".repeat(256 * 1024);
    let batches = 4 * RESET / (256 * 1024) + 2;
    for seq in 0..batches {
        store.apply(&[enqueue("c", seq, &big)]).expect("apply");
        // The log never holds much more than the reset size (plus its preallocation).
        assert!(
            log_len(dir.path()) < 2 * RESET,
            "{} bytes",
            log_len(dir.path())
        );
    }
    drop(store);
    assert_eq!(
        queued_after_reopen(dir.path()),
        (0..batches).collect::<Vec<_>>()
    );
}

#[test]
fn close_makes_the_log_empty() {
    for sync in [SyncMode::Always, INTERVAL] {
        let (mut store, dir) = fresh_redb(sync);
        store.apply(&mixed_batch()).expect("apply");
        assert!(log_len(dir.path()) > HEADER_LEN, "{sync:?}");
        store.flush().expect("flush");
        store.close().expect("close");
        assert_eq!(log_len(dir.path()), HEADER_LEN, "{sync:?}");
        drop(store);
        assert_eq!(reopen(dir.path(), sync), mixed_snapshot());
        assert_mixed_history(&mut RedbStore::open(dir.path(), sync).expect("reopen"));
    }
}

fn log_len(dir: &Path) -> u64 {
    fs::metadata(log_in(dir)).expect("log").len()
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
                found,
                supported: FORMAT_VERSION,
                ..
            } if found == FORMAT_VERSION + 1
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
    // A read writes what waits in the log into the database: 2 MiB, then their deletion.
    store.load().expect("load");
    store
        .apply(&[Op::DeleteSession {
            client_id: "c".into(),
        }])
        .expect("delete");
    store.close().expect("close");
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

/// Writes, with redb directly, the store a Herald from before presence left: format version 1,
/// only the tables `meta`, `sessions`, `queue` and `retained`, and a little data in each.
fn write_pre_presence_store(dir: &Path) {
    let db = Database::create(dir.join(DB_FILE)).expect("raw create");
    let txn = db.begin_write().expect("write");
    {
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert(KEY_FORMAT_VERSION, 1).expect("insert");
        meta.insert(KEY_NEXT_SEQ, 8).expect("insert");
        let session = codec::encode_session(&session(&["t/#"])).expect("encode");
        txn.open_table(SESSIONS)
            .expect("sessions")
            .insert("old", session.as_slice())
            .expect("insert");
        let queued = codec::encode_message(&message("t/old", "m7")).expect("encode");
        txn.open_table(QUEUE)
            .expect("queue")
            .insert(("old", 7), queued.as_slice())
            .expect("insert");
        let retained = codec::encode_message(&message("r", "kept")).expect("encode");
        txn.open_table(RETAINED)
            .expect("retained")
            .insert("r", retained.as_slice())
            .expect("insert");
    }
    txn.commit().expect("commit");
}

fn table_names(dir: &Path) -> Vec<String> {
    let db = Database::create(dir.join(DB_FILE)).expect("raw open");
    let txn = db.begin_read().expect("read");
    txn.list_tables()
        .expect("list")
        .map(|table| table.name().to_owned())
        .collect()
}

#[test]
fn a_store_from_before_presence_opens_and_gains_the_new_tables() {
    for sync in [SyncMode::Always, INTERVAL] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pre_presence_store(dir.path());
        let older = Snapshot {
            sessions: vec![("old".into(), session(&["t/#"]))],
            queues: vec![("old".into(), vec![(7, message("t/old", "m7"))])],
            retained: vec![message("r", "kept")],
            next_seq: 8,
            ..Snapshot::default()
        };
        let mut store = RedbStore::open(dir.path(), sync).expect("open");
        assert_eq!(store.load().expect("load"), older, "{sync:?}");
        assert_eq!(full_history(&mut store, "old"), []);
        drop(store);

        let mut names = table_names(dir.path());
        names.sort();
        let expected = [
            CHANNELS.name(),
            CLIENT_SEQS.name(),
            CREDENTIALS.name(),
            HISTORY.name(),
            INCOMING_QOS2.name(),
            META.name(),
            OUTBOX.name(),
            QUEUE.name(),
            RELEASED.name(),
            RETAINED.name(),
            SESSIONS.name(),
            TOKENS.name(),
        ];
        assert_eq!(names, expected, "{sync:?}");

        let mut store = RedbStore::open(dir.path(), sync).expect("reopen");
        store
            .apply(&[
                Op::PutClientSeq {
                    client_id: "old".into(),
                    seq: 1,
                },
                put_outbox("hook", 0, "e"),
                put_history("old", 1, 5, "e"),
            ])
            .expect("apply");
        drop(store);
        let snapshot = reopen(dir.path(), sync);
        assert_eq!(snapshot.sessions, older.sessions);
        assert_eq!(snapshot.client_seqs, [("old".to_owned(), 1)]);
        assert_eq!(snapshot.next_outbox_id, 1);
        assert_eq!(reopen_history(dir.path(), sync, "old").len(), 1);
        // The version is raised: a Herald of format 1 refuses the directory (it would start
        // from the seqs in `client_seqs`, which are no longer written).
        let db = Database::create(dir.path().join(DB_FILE)).expect("raw open");
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        let version = meta
            .get(KEY_FORMAT_VERSION)
            .expect("get")
            .map(|v| v.value());
        assert_eq!(version, Some(FORMAT_VERSION));
    }
}

/// Puts bytes that do not decode under `key` in `table`, with redb directly.
fn corrupt_value<K: redb::Key + 'static>(
    dir: &Path,
    table: TableDefinition<K, &'static [u8]>,
    key: K::SelfType<'_>,
) where
    for<'a> K::SelfType<'a>: std::borrow::Borrow<K::SelfType<'a>>,
{
    let db = Database::create(dir.join(DB_FILE)).expect("raw open");
    let txn = db.begin_write().expect("write");
    txn.open_table(table)
        .expect("table")
        .insert(key, [1_u8, 0, 0].as_slice())
        .expect("insert");
    txn.commit().expect("commit");
}

#[test]
fn an_undecodable_presence_value_is_an_error_not_a_panic() {
    let db_path = |dir: &TempDir| dir.path().join(DB_FILE);
    let check = |error: StoreError, dir: &TempDir, key: &str| {
        assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
        assert_names(&error, &db_path(dir));
        assert!(error.to_string().contains(key), "{error}");
    };

    let (store, dir) = fresh_redb(SyncMode::Always);
    drop(store);
    corrupt_value(dir.path(), CHANNELS, 77_777);
    let mut store = RedbStore::open(dir.path(), SyncMode::Always).expect("open");
    check(store.load().expect_err("load must fail"), &dir, "77777");

    let (store, dir) = fresh_redb(SyncMode::Always);
    drop(store);
    corrupt_value(dir.path(), OUTBOX, ("broken-sink", 3));
    let mut store = RedbStore::open(dir.path(), SyncMode::Always).expect("open");
    check(
        store.load().expect_err("load must fail"),
        &dir,
        "broken-sink",
    );

    // Only each client's newest history entry is read at start-up (`last_events`): one that
    // does not decode still gives its seq (from its key), and the query that reads it fails.
    let (store, dir) = fresh_redb(SyncMode::Always);
    drop(store);
    corrupt_value(dir.path(), HISTORY, ("broken-client", 3));
    let mut store = RedbStore::open(dir.path(), SyncMode::Always).expect("open");
    assert_eq!(store.load().expect("load"), Snapshot::default());
    assert_eq!(
        crate::conformance::last_events(&mut store),
        [("broken-client".to_owned(), 3, 0, bytes::Bytes::new())]
    );
    let error = full_history_error(&mut store, "broken-client");
    check(error, &dir, "broken-client");
    assert_eq!(full_history(&mut store, "other"), []);
}

fn full_history_error(store: &mut RedbStore, client: &str) -> StoreError {
    store
        .history(client, 0, u64::MAX, 10)
        .expect_err("history must fail")
}
