//! Behavioural tests every [`Store`] must pass, written once and run against [`MemoryStore`]
//! and [`crate::RedbStore`] in both sync modes. What only a disk can show (restart, crash,
//! corrupt files) is in `redb_tests`. The tests of the presence ops are in `presence`.

mod auth;
mod presence;

use bytes::Bytes;

use crate::{ChannelRecord, Op, SessionRecord, Snapshot, Store, StoredMessage};

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

pub(crate) fn channel(client: &str, info: &str) -> ChannelRecord {
    ChannelRecord {
        client_id: client.to_owned(),
        info: Bytes::copy_from_slice(info.as_bytes()),
    }
}

pub(crate) fn put_outbox(sink: &str, id: u64, payload: &str) -> Op {
    Op::PutOutbox {
        sink: sink.to_owned(),
        id,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

pub(crate) fn put_history(client: &str, seq: u64, time_ms: u64, payload: &str) -> Op {
    Op::PutHistory {
        client_id: client.to_owned(),
        seq,
        time_ms,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

/// A history entry as [`Store::history`] returns it.
pub(crate) fn entry(seq: u64, time_ms: u64, payload: &str) -> (u64, u64, Bytes) {
    (seq, time_ms, Bytes::copy_from_slice(payload.as_bytes()))
}

/// The whole history of `client`.
/// What [`Store::last_events`] gives, collected.
pub(crate) fn last_events(store: &mut impl Store) -> Vec<(String, u64, u64, Bytes)> {
    let mut found = Vec::new();
    store
        .last_events(&mut |id, seq, time_ms, payload| {
            found.push((id.to_owned(), seq, time_ms, Bytes::copy_from_slice(payload)));
        })
        .expect("last events");
    found
}

pub(crate) fn full_history(store: &mut impl Store, client: &str) -> Vec<(u64, u64, Bytes)> {
    store
        .history(client, 0, u64::MAX, usize::MAX)
        .expect("history")
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
        Op::PutReleased {
            client_id: "a".into(),
            seq: 1,
        },
        Op::PutReleased {
            client_id: "a".into(),
            seq: 3,
        },
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
        Op::PutReleased {
            client_id: "c".into(),
            seq: 4,
        },
        Op::PutIncomingQos2 {
            client_id: "c".into(),
            packet_id: 9,
        },
        Op::DeleteSession {
            client_id: "c".into(),
        },
        Op::PutIncomingQos2 {
            client_id: "b".into(),
            packet_id: u16::MAX,
        },
        Op::PutIncomingQos2 {
            client_id: "a".into(),
            packet_id: 7,
        },
        Op::PutIncomingQos2 {
            client_id: "a".into(),
            packet_id: 2,
        },
        Op::PutIncomingQos2 {
            client_id: "a".into(),
            packet_id: 3,
        },
        Op::DeleteIncomingQos2 {
            client_id: "a".into(),
            packet_id: 3,
        },
        Op::DeleteIncomingQos2 {
            client_id: "b".into(),
            packet_id: 1,
        },
        Op::PutClientSeq {
            client_id: "a".into(),
            seq: 3,
        },
        Op::PutClientSeq {
            client_id: "ab".into(),
            seq: 7,
        },
        Op::PutClientSeq {
            client_id: "a".into(),
            seq: 5,
        },
        Op::PutChannel {
            channel_id: 1 << 64,
            record: channel("a", "a-1"),
        },
        Op::PutChannel {
            channel_id: 2,
            record: channel("ab", "ab-2"),
        },
        Op::PutChannel {
            channel_id: u128::MAX,
            record: channel("b", "closed"),
        },
        Op::DeleteChannel {
            channel_id: u128::MAX,
        },
        put_outbox("hook", 0, "h0"),
        put_outbox("backend", 1, "b1"),
        put_outbox("hook", 2, "h2"),
        put_outbox("hook", 3, "h3"),
        Op::DeleteOutbox {
            sink: "hook".into(),
            id: 2,
        },
        put_outbox("gone", 4, "g4"),
        Op::DeleteOutbox {
            sink: "gone".into(),
            id: 4,
        },
        put_history("a", 1, 100, "a1"),
        put_history("a", 2, 200, "a2"),
        put_history("a", 3, 300, "a3"),
        put_history("b", 1, 150, "b1"),
        Op::PruneHistory {
            client_id: "a".into(),
            below_seq: 2,
        },
        Op::PutToken {
            token: "tok".into(),
            record: mixed_token(),
        },
        Op::PutCredential {
            client_id: "a".into(),
            record: mixed_credential(),
        },
    ]
}

fn mixed_token() -> crate::TokenRecord {
    crate::TokenRecord {
        resources: vec!["x/#".into()],
        actions: 1,
        expire_at_ms: 1_800_000_000_000,
    }
}

fn mixed_credential() -> crate::CredentialRecord {
    crate::CredentialRecord {
        key_id: "DK-a".into(),
        secret: "secret-a".into(),
        created_at_ms: 1,
    }
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
        client_seqs: vec![("a".into(), 5), ("ab".into(), 7)],
        channels: vec![(2, channel("ab", "ab-2")), (1 << 64, channel("a", "a-1"))],
        outboxes: vec![
            ("backend".into(), vec![(1, Bytes::from_static(b"b1"))]),
            (
                "hook".into(),
                vec![
                    (0, Bytes::from_static(b"h0")),
                    (3, Bytes::from_static(b"h3")),
                ],
            ),
        ],
        next_outbox_id: 5,
        tokens: vec![("tok".into(), mixed_token())],
        credentials: vec![("a".into(), mixed_credential())],
        incoming_qos2: vec![("a".into(), vec![2, 7]), ("b".into(), vec![u16::MAX])],
        released: vec![("a".into(), vec![3])],
    }
}

/// Asserts that `store` holds the history [`mixed_batch`] leaves in an empty store.
pub(crate) fn assert_mixed_history(store: &mut impl Store) {
    assert_eq!(
        full_history(store, "a"),
        [entry(2, 200, "a2"), entry(3, 300, "a3")]
    );
    assert_eq!(full_history(store, "b"), [entry(1, 150, "b1")]);
    assert_eq!(full_history(store, "ab"), []);
}

pub(crate) fn empty_store_loads_empty<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    assert_eq!(store.load().expect("load"), Snapshot::default());
}

pub(crate) fn every_op_round_trips_through_load<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    store.apply(&mixed_batch()).expect("apply");
    assert_eq!(store.load().expect("load"), mixed_snapshot());
    assert_eq!(
        last_events(&mut store),
        [
            ("a".to_owned(), 3, 300, Bytes::from_static(b"a3")),
            ("b".to_owned(), 1, 150, Bytes::from_static(b"b1")),
        ]
    );
    assert_mixed_history(&mut store);
}

pub(crate) fn ops_are_idempotent<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    store.apply(&mixed_batch()).expect("apply");
    store.apply(&mixed_batch()).expect("apply again");
    assert_eq!(store.load().expect("load"), mixed_snapshot());
    assert_mixed_history(&mut store);
    // Replaying older batches over a later state converges too.
    let later = [
        Op::DeleteSession {
            client_id: "a".into(),
        },
        Op::PutClientSeq {
            client_id: "a".into(),
            seq: 6,
        },
        Op::DeleteChannel { channel_id: 2 },
        Op::DeleteOutbox {
            sink: "hook".into(),
            id: 0,
        },
        put_history("a", 4, 400, "a4"),
        Op::PruneHistory {
            client_id: "a".into(),
            below_seq: 3,
        },
    ];
    store.apply(&later).expect("apply");
    let after_later = store.load().expect("load");
    let history_after_later = full_history(&mut store, "a");
    assert_eq!(
        history_after_later,
        [entry(3, 300, "a3"), entry(4, 400, "a4")]
    );
    store.apply(&later).expect("apply again");
    assert_eq!(store.load().expect("load"), after_later);
    assert_eq!(full_history(&mut store, "a"), history_after_later);
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
        ops.push(Op::PutIncomingQos2 {
            client_id: (*client).to_owned(),
            packet_id: i as u16 + 1,
        });
        ops.push(Op::PutReleased {
            client_id: (*client).to_owned(),
            seq: base + 1,
        });
    }
    ops.push(Op::PutIncomingQos2 {
        client_id: "a".into(),
        packet_id: u16::MAX,
    });
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
    assert_eq!(
        snapshot.incoming_qos2,
        [
            ("".to_owned(), vec![5]),
            ("a\u{0}".to_owned(), vec![3]),
            ("ab".to_owned(), vec![2]),
            ("b".to_owned(), vec![4])
        ],
        "the session's QoS 2 ids go with it"
    );
    assert_eq!(
        snapshot.released,
        [
            ("".to_owned(), vec![41]),
            ("a\u{0}".to_owned(), vec![21]),
            ("ab".to_owned(), vec![11]),
            ("b".to_owned(), vec![31])
        ],
        "and its released marks"
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
    assert_mixed_history(&mut store);
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
    let big_channel = ChannelRecord {
        client_id: "ü".into(),
        info: big.payload.clone(),
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
            Op::PutChannel {
                channel_id: 0,
                record: big_channel.clone(),
            },
            Op::PutChannel {
                channel_id: 1,
                record: channel("", ""),
            },
            Op::PutOutbox {
                sink: "big".into(),
                id: 0,
                payload: big.payload.clone(),
            },
            put_outbox("empty", 1, ""),
            Op::PutHistory {
                client_id: "c".into(),
                seq: 0,
                time_ms: u64::MAX,
                payload: big.payload.clone(),
            },
            put_history("c", 1, 0, ""),
        ])
        .expect("apply");
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.retained, vec![big.clone()]);
    assert_eq!(snapshot.queues, vec![("c".into(), vec![(0, empty)])]);
    assert_eq!(
        snapshot.channels,
        vec![(0, big_channel), (1, channel("", ""))]
    );
    assert_eq!(
        snapshot.outboxes,
        vec![
            ("big".into(), vec![(0, big.payload.clone())]),
            ("empty".into(), vec![(1, Bytes::new())]),
        ]
    );
    assert_eq!(
        full_history(&mut store, "c"),
        [(0, u64::MAX, big.payload), entry(1, 0, "")]
    );
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
            #[test]
            fn client_seqs_and_channels_are_kept_by_key() {
                super::presence::client_seqs_and_channels_are_kept_by_key($fresh)
            }
            #[test]
            fn delete_outbox_touches_only_its_own_entry() {
                super::presence::delete_outbox_touches_only_its_own_entry($fresh)
            }
            #[test]
            fn prune_history_touches_only_its_own_client() {
                super::presence::prune_history_touches_only_its_own_client($fresh)
            }
            #[test]
            fn next_outbox_id_is_one_past_the_largest_ever_stored() {
                super::presence::next_outbox_id_is_one_past_the_largest_ever_stored($fresh)
            }
            #[test]
            fn history_entries_are_found_by_client_and_seq() {
                super::presence::history_entries_are_found_by_client_and_seq($fresh)
            }
            #[test]
            fn history_filters_by_time_and_limit() {
                super::presence::history_filters_by_time_and_limit($fresh)
            }
            #[test]
            fn only_the_newest_history_entry_of_each_client_is_in_the_snapshot() {
                super::presence::only_the_newest_history_entry_of_each_client_is_in_the_snapshot(
                    $fresh,
                )
            }
            #[test]
            fn later_presence_ops_in_a_batch_win() {
                super::presence::later_presence_ops_in_a_batch_win($fresh)
            }
            #[test]
            fn tokens_and_credentials_are_kept_by_key() {
                super::auth::tokens_and_credentials_are_kept_by_key($fresh)
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
