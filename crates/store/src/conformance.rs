//! Behavioural tests every [`Store`] must pass, written once and run against [`MemoryStore`]
//! and [`crate::RedbStore`] in both sync modes. What only a disk can show (restart, crash,
//! corrupt files) is in `redb_tests`.

use bytes::Bytes;

use crate::{Op, SessionRecord, Snapshot, Store, StoredMessage};

/// Builds a fresh, empty store. The second value keeps its files alive.
pub(crate) trait Fresh<S: Store, G>: Fn() -> (S, G) {}
impl<S: Store, G, F: Fn() -> (S, G)> Fresh<S, G> for F {}

pub(crate) fn message(topic: &str, payload: &str) -> StoredMessage {
    StoredMessage {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: 1,
        retain: false,
        published_at_ms: 1_700_000_000_000,
    }
}

pub(crate) fn session(filters: &[&str]) -> SessionRecord {
    SessionRecord {
        subscriptions: filters.iter().map(|f| ((*f).to_owned(), 1)).collect(),
        created_at_ms: 1_600_000_000_000,
    }
}

pub(crate) fn enqueue(client: &str, seq: u64, payload: &str) -> Op {
    Op::Enqueue {
        client_id: client.to_owned(),
        seq,
        message: message(&format!("t/{client}"), payload),
    }
}

fn queued(store: &mut impl Store, client: &str) -> Vec<u64> {
    let snapshot = store.load().expect("load");
    snapshot
        .queues
        .into_iter()
        .find(|(id, _)| id == client)
        .map(|(_, messages)| messages.into_iter().map(|(seq, _)| seq).collect())
        .unwrap_or_default()
}

/// One batch with every kind of op, including ones that undo earlier ones in the same batch.
pub(crate) fn mixed_batch() -> Vec<Op> {
    vec![
        Op::PutSession {
            client_id: "a".into(),
            record: session(&["x/+", "y/#"]),
        },
        Op::PutSession {
            client_id: "b".into(),
            record: session(&[]),
        },
        enqueue("a", 0, "a0"),
        enqueue("a", 1, "a1"),
        enqueue("b", 2, "b2"),
        enqueue("a", 3, "a3"),
        Op::Dequeue {
            client_id: "a".into(),
            seq: 1,
        },
        Op::PutRetained {
            message: StoredMessage {
                retain: true,
                ..message("r/1", "kept")
            },
        },
        Op::PutRetained {
            message: message("r/2", "dropped"),
        },
        Op::DeleteRetained {
            topic: "r/2".into(),
        },
        Op::PutSession {
            client_id: "c".into(),
            record: session(&["z"]),
        },
        enqueue("c", 4, "c4"),
        Op::DeleteSession {
            client_id: "c".into(),
        },
    ]
}

/// What [`mixed_batch`] leaves in an empty store.
pub(crate) fn mixed_snapshot() -> Snapshot {
    let in_queue =
        |client: &str, seq: u64, payload: &str| (seq, message(&format!("t/{client}"), payload));
    Snapshot {
        sessions: vec![
            ("a".into(), session(&["x/+", "y/#"])),
            ("b".into(), session(&[])),
        ],
        queues: vec![
            (
                "a".into(),
                vec![in_queue("a", 0, "a0"), in_queue("a", 3, "a3")],
            ),
            ("b".into(), vec![in_queue("b", 2, "b2")]),
        ],
        retained: vec![StoredMessage {
            retain: true,
            ..message("r/1", "kept")
        }],
        next_seq: 5,
    }
}

pub(crate) fn empty_store_loads_empty<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    assert_eq!(store.load().expect("load"), Snapshot::default());
}

pub(crate) fn every_op_round_trips_through_load<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    store.apply(&mixed_batch()).expect("apply");
    assert_eq!(store.load().expect("load"), mixed_snapshot());
}

pub(crate) fn ops_are_idempotent<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    store.apply(&mixed_batch()).expect("apply");
    store.apply(&mixed_batch()).expect("apply again");
    assert_eq!(store.load().expect("load"), mixed_snapshot());
    // Replaying older batches over a later state converges too.
    let later = [Op::DeleteSession {
        client_id: "a".into(),
    }];
    store.apply(&later).expect("apply");
    let after_later = store.load().expect("load");
    store.apply(&later).expect("apply again");
    assert_eq!(store.load().expect("load"), after_later);
}

pub(crate) fn queues_iterate_in_seq_order<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    // Seqs that sort differently as little-endian bytes or as text.
    let seqs = [256, 1 << 40, 1, 255, 10, 65_536, 2];
    let ops: Vec<Op> = seqs.iter().map(|&seq| enqueue("c", seq, "m")).collect();
    store.apply(&ops).expect("apply");
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    assert_eq!(queued(&mut store, "c"), sorted);
}

pub(crate) fn delete_session_removes_only_its_queue<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    // "a" is a prefix of "ab", and "a\u{0}" sorts right after "a": neither may be touched.
    let clients = ["a", "ab", "a\u{0}", "b", ""];
    let mut ops = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let base = 10 * i as u64;
        ops.push(Op::PutSession {
            client_id: (*client).to_owned(),
            record: session(&["t"]),
        });
        ops.push(enqueue(client, base, "first"));
        ops.push(enqueue(client, base + 1, "second"));
    }
    ops.push(enqueue("a", u64::MAX - 1, "edge"));
    store.apply(&ops).expect("apply");

    store
        .apply(&[Op::DeleteSession {
            client_id: "a".into(),
        }])
        .expect("delete");
    let snapshot = store.load().expect("load");
    let sessions: Vec<&str> = snapshot
        .sessions
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(sessions, ["", "a\u{0}", "ab", "b"]);
    let queues: Vec<(&str, Vec<u64>)> = snapshot
        .queues
        .iter()
        .map(|(id, messages)| (id.as_str(), messages.iter().map(|(seq, _)| *seq).collect()))
        .collect();
    assert_eq!(
        queues,
        [
            ("", vec![40, 41]),
            ("a\u{0}", vec![20, 21]),
            ("ab", vec![10, 11]),
            ("b", vec![30, 31])
        ]
    );
    // Deleting a session that does not exist is fine (idempotence).
    store
        .apply(&[Op::DeleteSession {
            client_id: "a".into(),
        }])
        .expect("delete again");
}

pub(crate) fn next_seq_is_one_past_the_largest_ever_stored<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let next_seq = |store: &mut S| store.load().expect("load").next_seq;
    assert_eq!(next_seq(&mut store), 0);
    store.apply(&[enqueue("x", 0, "m")]).expect("apply");
    assert_eq!(next_seq(&mut store), 1);
    store
        .apply(&[enqueue("x", 9, "m"), enqueue("y", 4, "m")])
        .expect("apply");
    assert_eq!(next_seq(&mut store), 10);
    // Removing the newest message does not hand its seq out again.
    store
        .apply(&[Op::Dequeue {
            client_id: "x".into(),
            seq: 9,
        }])
        .expect("dequeue");
    assert_eq!(next_seq(&mut store), 10);
    store
        .apply(&[Op::DeleteSession {
            client_id: "x".into(),
        }])
        .expect("delete");
    store
        .apply(&[Op::Dequeue {
            client_id: "y".into(),
            seq: 4,
        }])
        .expect("dequeue");
    let snapshot = store.load().expect("load");
    assert!(snapshot.queues.is_empty());
    assert_eq!(snapshot.next_seq, 10);
}

pub(crate) fn later_ops_in_a_batch_win<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    store
        .apply(&[
            Op::PutRetained {
                message: message("r", "one"),
            },
            Op::PutRetained {
                message: message("r", "two"),
            },
            enqueue("c", 1, "old"),
            enqueue("c", 1, "new"),
            Op::PutSession {
                client_id: "c".into(),
                record: session(&["old"]),
            },
            Op::PutSession {
                client_id: "c".into(),
                record: session(&["new"]),
            },
        ])
        .expect("apply");
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.retained, vec![message("r", "two")]);
    assert_eq!(
        snapshot.queues,
        vec![("c".into(), vec![(1, message("t/c", "new"))])]
    );
    assert_eq!(snapshot.sessions, vec![("c".into(), session(&["new"]))]);
}

pub(crate) fn flush_and_empty_batches_change_nothing<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    store.flush().expect("flush with nothing applied");
    store.apply(&[]).expect("empty batch");
    store.apply(&mixed_batch()).expect("apply");
    store.flush().expect("flush");
    store.flush().expect("flush again");
    store.apply(&[]).expect("empty batch");
    assert_eq!(store.load().expect("load"), mixed_snapshot());
}

pub(crate) fn payloads_keep_every_byte<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let payload: Vec<u8> = (0..=255).cycle().take(70_000).collect();
    let big = StoredMessage {
        topic: "bin/ü".into(),
        payload: Bytes::from(payload),
        qos: 2,
        retain: true,
        published_at_ms: u64::MAX,
    };
    let empty = StoredMessage {
        payload: Bytes::new(),
        qos: 0,
        ..message("empty", "")
    };
    store
        .apply(&[
            Op::PutRetained {
                message: big.clone(),
            },
            Op::Enqueue {
                client_id: "c".into(),
                seq: 0,
                message: empty.clone(),
            },
        ])
        .expect("apply");
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.retained, vec![big]);
    assert_eq!(snapshot.queues, vec![("c".into(), vec![(0, empty)])]);
}

/// Runs every behavioural test above against the stores that `fresh` builds.
macro_rules! conformance_tests {
    ($name:ident, $fresh:expr) => {
        mod $name {
            #[test]
            fn empty_store_loads_empty() {
                super::empty_store_loads_empty($fresh)
            }
            #[test]
            fn every_op_round_trips_through_load() {
                super::every_op_round_trips_through_load($fresh)
            }
            #[test]
            fn ops_are_idempotent() {
                super::ops_are_idempotent($fresh)
            }
            #[test]
            fn queues_iterate_in_seq_order() {
                super::queues_iterate_in_seq_order($fresh)
            }
            #[test]
            fn delete_session_removes_only_its_queue() {
                super::delete_session_removes_only_its_queue($fresh)
            }
            #[test]
            fn next_seq_is_one_past_the_largest_ever_stored() {
                super::next_seq_is_one_past_the_largest_ever_stored($fresh)
            }
            #[test]
            fn later_ops_in_a_batch_win() {
                super::later_ops_in_a_batch_win($fresh)
            }
            #[test]
            fn flush_and_empty_batches_change_nothing() {
                super::flush_and_empty_batches_change_nothing($fresh)
            }
            #[test]
            fn payloads_keep_every_byte() {
                super::payloads_keep_every_byte($fresh)
            }
        }
    };
}

conformance_tests!(memory, || (crate::MemoryStore::new(), ()));
conformance_tests!(redb_always, || crate::redb_tests::fresh_redb(
    crate::SyncMode::Always
));
conformance_tests!(redb_interval, || crate::redb_tests::fresh_redb(
    crate::SyncMode::Interval { millis: 1000 }
));
