//! Behavioural tests of the presence ops (client seqs, channels, outboxes, history), run by the
//! `conformance_tests!` macro of the parent module against every store.

use bytes::Bytes;

use super::{Fresh, channel, enqueue, entry, full_history, last_events, put_history, put_outbox};
use crate::{Op, Snapshot, Store};

/// Ids that give different orders as little-endian bytes, as text and as numbers.
const CLIENTS: [&str; 5] = ["a", "ab", "a\u{0}", "b", ""];

/// The outboxes of a snapshot as (sink, ids).
fn outbox_ids(snapshot: &Snapshot) -> Vec<(&str, Vec<u64>)> {
    snapshot
        .outboxes
        .iter()
        .map(|(sink, entries)| (sink.as_str(), entries.iter().map(|(id, _)| *id).collect()))
        .collect()
}

/// The seqs in the whole history of `client`.
fn history_seqs(store: &mut impl Store, client: &str) -> Vec<u64> {
    full_history(store, client)
        .into_iter()
        .map(|(seq, _, _)| seq)
        .collect()
}

pub(crate) fn client_seqs_and_channels_are_kept_by_key<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let mut ops: Vec<Op> = CLIENTS
        .iter()
        .enumerate()
        .map(|(i, client)| Op::PutClientSeq {
            client_id: (*client).to_owned(),
            seq: i as u64,
        })
        .collect();
    ops.push(Op::PutClientSeq {
        client_id: "b".into(),
        seq: u64::MAX,
    });
    let channel_ids = [256, 1, u128::MAX, 1 << 64, 0, 1 << 127, 255];
    for id in channel_ids {
        ops.push(Op::PutChannel {
            channel_id: id,
            record: channel(&format!("c{id}"), &format!("info {id}")),
        });
    }
    store.apply(&ops).expect("apply");
    store
        .apply(&[
            Op::DeleteChannel { channel_id: 256 },
            Op::DeleteChannel { channel_id: 256 },
            Op::DeleteChannel { channel_id: 12345 },
        ])
        .expect("delete");

    let snapshot = store.load().expect("load");
    assert_eq!(
        snapshot.client_seqs,
        [
            ("".to_owned(), 4),
            ("a".to_owned(), 0),
            ("a\u{0}".to_owned(), 2),
            ("ab".to_owned(), 1),
            ("b".to_owned(), u64::MAX),
        ]
    );
    let expected: Vec<(u128, _)> = [0, 1, 255, 1 << 64, 1 << 127, u128::MAX]
        .into_iter()
        .map(|id| (id, channel(&format!("c{id}"), &format!("info {id}"))))
        .collect();
    assert_eq!(snapshot.channels, expected);
    // Presence state is independent of sessions: deleting one leaves it alone.
    store
        .apply(&[Op::DeleteSession {
            client_id: "a".into(),
        }])
        .expect("delete session");
    assert_eq!(store.load().expect("load"), snapshot);
}

pub(crate) fn delete_outbox_touches_only_its_own_entry<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let mut ops = Vec::new();
    for (i, sink) in CLIENTS.iter().enumerate() {
        let base = 10 * i as u64;
        ops.push(put_outbox(sink, base, "first"));
        ops.push(put_outbox(sink, base + 1, "second"));
        // The same id in every sink: the key is (sink, id).
        ops.push(put_outbox(sink, 1000, "shared"));
    }
    ops.push(put_outbox("a", u64::MAX - 1, "edge"));
    store.apply(&ops).expect("apply");

    let delete = |sink: &str, id: u64| Op::DeleteOutbox {
        sink: sink.to_owned(),
        id,
    };
    store.apply(&[delete("a", 1000)]).expect("delete");
    let snapshot = store.load().expect("load");
    assert_eq!(
        outbox_ids(&snapshot),
        [
            ("", vec![40, 41, 1000]),
            ("a", vec![0, 1, u64::MAX - 1]),
            ("a\u{0}", vec![20, 21, 1000]),
            ("ab", vec![10, 11, 1000]),
            ("b", vec![30, 31, 1000]),
        ]
    );
    // An emptied outbox leaves the snapshot; deleting what is not there is fine.
    store
        .apply(&[
            delete("a", 0),
            delete("a", 1),
            delete("a", u64::MAX - 1),
            delete("a", 1000),
            delete("missing", 3),
            delete("", 1000),
        ])
        .expect("delete");
    let snapshot = store.load().expect("load");
    assert_eq!(
        outbox_ids(&snapshot),
        [
            ("", vec![40, 41]),
            ("a\u{0}", vec![20, 21, 1000]),
            ("ab", vec![10, 11, 1000]),
            ("b", vec![30, 31, 1000]),
        ]
    );
    assert_eq!(
        snapshot.outboxes[2].1[2],
        (1000, Bytes::from_static(b"shared"))
    );
    assert_eq!(snapshot.next_outbox_id, u64::MAX);
}

pub(crate) fn prune_history_touches_only_its_own_client<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let mut ops = Vec::new();
    for client in CLIENTS {
        for seq in 0..5 {
            ops.push(put_history(
                client,
                seq,
                1000 + seq,
                &format!("{client}{seq}"),
            ));
        }
    }
    ops.push(put_history("a", u64::MAX, 9999, "last"));
    store.apply(&ops).expect("apply");
    let prune = |client: &str, below_seq: u64| Op::PruneHistory {
        client_id: client.to_owned(),
        below_seq,
    };

    store.apply(&[prune("a", 0)]).expect("prune nothing");
    assert_eq!(history_seqs(&mut store, "a"), [0, 1, 2, 3, 4, u64::MAX]);
    store.apply(&[prune("a", 3)]).expect("prune");
    assert_eq!(history_seqs(&mut store, "a"), [3, 4, u64::MAX]);
    store.apply(&[prune("a", 3)]).expect("prune again");
    assert_eq!(history_seqs(&mut store, "a"), [3, 4, u64::MAX]);
    // Below u64::MAX: everything but the entry at u64::MAX.
    store.apply(&[prune("a", u64::MAX)]).expect("prune");
    assert_eq!(
        full_history(&mut store, "a"),
        [entry(u64::MAX, 9999, "last")]
    );
    store.apply(&[prune("missing", 10)]).expect("prune unknown");
    for client in ["ab", "a\u{0}", "b", ""] {
        assert_eq!(
            history_seqs(&mut store, client),
            [0, 1, 2, 3, 4],
            "{client:?}"
        );
    }
    assert_eq!(
        full_history(&mut store, "ab")[2],
        entry(2, 1002, "ab2"),
        "payloads stay with their keys"
    );
}

pub(crate) fn next_outbox_id_is_one_past_the_largest_ever_stored<S: Store, G>(
    fresh: impl Fresh<S, G>,
) {
    let (mut store, _guard) = fresh();
    let next_id = |store: &mut S| store.load().expect("load").next_outbox_id;
    assert_eq!(next_id(&mut store), 0);
    store.apply(&[put_outbox("s", 0, "e")]).expect("apply");
    assert_eq!(next_id(&mut store), 1);
    store
        .apply(&[put_outbox("s", 9, "e"), put_outbox("t", 4, "e")])
        .expect("apply");
    assert_eq!(next_id(&mut store), 10);
    // Deleting the newest entry does not hand its id out again.
    let delete = |sink: &str, id: u64| Op::DeleteOutbox {
        sink: sink.to_owned(),
        id,
    };
    store
        .apply(&[delete("s", 9), delete("s", 0), delete("t", 4)])
        .expect("delete");
    let snapshot = store.load().expect("load");
    assert!(snapshot.outboxes.is_empty());
    assert_eq!(snapshot.next_outbox_id, 10);
    // Queue seqs and outbox ids are counted apart.
    store.apply(&[enqueue("c", 100, "m")]).expect("enqueue");
    let snapshot = store.load().expect("load");
    assert_eq!((snapshot.next_seq, snapshot.next_outbox_id), (101, 10));
    store.apply(&[put_outbox("s", 20, "e")]).expect("apply");
    let snapshot = store.load().expect("load");
    assert_eq!((snapshot.next_seq, snapshot.next_outbox_id), (101, 21));
    // The largest id saturates instead of wrapping to 0.
    store
        .apply(&[put_outbox("s", u64::MAX, "e")])
        .expect("apply");
    assert_eq!(next_id(&mut store), u64::MAX);
}

pub(crate) fn history_entries_are_found_by_client_and_seq<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let mut ops = vec![
        put_history("c", 1, 100, "e1"),
        put_history("c", 2, 200, "e2"),
        put_history("c", 3, 300, "e3"),
        put_history("cc", 4, 300, "other"),
    ];
    ops.push(Op::PruneHistory {
        client_id: "c".into(),
        below_seq: 2,
    });
    store.apply(&ops).expect("apply");
    let mut entry = |client: &str, seq: u64| {
        let wanted = [(client.to_owned(), seq)];
        let mut found = store.history_entries(&wanted).expect("read");
        assert_eq!(found.len(), 1);
        found.remove(0)
    };
    assert_eq!(entry("c", 3), Some(Bytes::from_static(b"e3")));
    assert_eq!(entry("c", 2), Some(Bytes::from_static(b"e2")));
    assert_eq!(entry("c", 1), None, "pruned");
    assert_eq!(entry("c", 4), None, "another client's seq");
    assert_eq!(entry("missing", 1), None);
    // Several at once, in the order asked for.
    let wanted = [
        ("cc".to_owned(), 4),
        ("c".to_owned(), 1),
        ("c".to_owned(), 3),
    ];
    assert_eq!(
        store.history_entries(&wanted).expect("read"),
        [
            Some(Bytes::from_static(b"other")),
            None,
            Some(Bytes::from_static(b"e3"))
        ]
    );
}

pub(crate) fn history_filters_by_time_and_limit<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    // Seq 7 was seen at 250 after seq 6 at 500: the clock stepped back.
    let times = [
        (1, 100),
        (2, 200),
        (3, 200),
        (4, 300),
        (5, 400),
        (6, 500),
        (7, 250),
    ];
    let mut ops: Vec<Op> = times
        .iter()
        .map(|&(seq, time)| put_history("c", seq, time, &format!("e{seq}")))
        .collect();
    // Neighbouring client ids with entries in every range, which must never show up.
    for client in ["", "c\u{0}", "cc", "b"] {
        ops.push(put_history(client, 3, 200, "other"));
        ops.push(put_history(client, 8, 300, "other"));
    }
    store.apply(&ops).expect("apply");

    let mut seqs = |from: u64, to: u64, limit: usize| -> Vec<u64> {
        store
            .history("c", from, to, limit)
            .expect("history")
            .into_iter()
            .map(|(seq, _, _)| seq)
            .collect()
    };
    assert_eq!(seqs(0, u64::MAX, 100), [1, 2, 3, 4, 5, 6, 7]);
    // Both bounds are inclusive; results stay in seq (emission) order.
    assert_eq!(seqs(200, 300, 100), [2, 3, 4, 7]);
    assert_eq!(seqs(200, 300, 2), [2, 3], "oldest first");
    assert_eq!(seqs(200, 300, 4), [2, 3, 4, 7]);
    assert_eq!(seqs(500, 500, 10), [6]);
    assert_eq!(seqs(201, 299, 10), [7]);
    assert_eq!(seqs(0, 99, 10), Vec::<u64>::new());
    assert_eq!(seqs(501, u64::MAX, 10), Vec::<u64>::new());
    assert_eq!(seqs(0, u64::MAX, 0), Vec::<u64>::new(), "limit 0");
    assert_eq!(seqs(300, 200, 10), Vec::<u64>::new(), "from after to");

    assert_eq!(
        store.history("c", 250, 250, 10).expect("history"),
        [entry(7, 250, "e7")]
    );
    for client in ["missing", "c\u{1}", "C"] {
        assert_eq!(
            store.history(client, 0, u64::MAX, 10).expect("history"),
            [],
            "{client:?}"
        );
    }
    assert_eq!(
        store.history("", 0, u64::MAX, 10).expect("history"),
        [entry(3, 200, "other"), entry(8, 300, "other")]
    );
}

pub(crate) fn only_the_newest_history_entry_of_each_client_is_in_the_snapshot<S: Store, G>(
    fresh: impl Fresh<S, G>,
) {
    let (mut store, _guard) = fresh();
    // Client ids that are prefixes of each other, an empty one, and seqs at both ends.
    store
        .apply(&[
            put_history("c", 1, 10, "c1"),
            put_history("c", 2, 20, "c2"),
            put_history("ca", 0, 5, "ca0"),
            put_history("c\u{0}", 7, 70, "c0-7"),
            put_history("", u64::MAX, 1, "empty"),
            put_history("d", u64::MAX, 30, "d-max"),
            put_history("d", 3, 40, "d3"),
        ])
        .expect("apply");
    let newest = |client: &str, seq: u64, time_ms: u64, payload: &'static str| {
        (
            client.to_owned(),
            seq,
            time_ms,
            Bytes::from_static(payload.as_bytes()),
        )
    };
    assert_eq!(
        last_events(&mut store),
        [
            newest("", u64::MAX, 1, "empty"),
            newest("c", 2, 20, "c2"),
            newest("c\u{0}", 7, 70, "c0-7"),
            newest("ca", 0, 5, "ca0"),
            newest("d", u64::MAX, 30, "d-max"),
        ]
    );
    // The start-up snapshot holds none of it.
    assert_eq!(store.load().expect("load"), Snapshot::default());
    // The rest of the history stays where it was.
    assert_eq!(
        full_history(&mut store, "c"),
        [entry(1, 10, "c1"), entry(2, 20, "c2")]
    );
    // Pruning keeps the newest entry; a client whose history is pruned away has none.
    store
        .apply(&[
            Op::PruneHistory {
                client_id: "c".into(),
                below_seq: 2,
            },
            Op::PruneHistory {
                client_id: "ca".into(),
                below_seq: 1,
            },
        ])
        .expect("prune");
    let clients: Vec<(String, u64)> = last_events(&mut store)
        .into_iter()
        .map(|(client, seq, _, _)| (client, seq))
        .collect();
    assert_eq!(
        clients,
        [
            ("".to_owned(), u64::MAX),
            ("c".to_owned(), 2),
            ("c\u{0}".to_owned(), 7),
            ("d".to_owned(), u64::MAX),
        ]
    );
}

pub(crate) fn later_presence_ops_in_a_batch_win<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let seq = |seq: u64| Op::PutClientSeq {
        client_id: "c".into(),
        seq,
    };
    let put_channel = |info: &str| Op::PutChannel {
        channel_id: 9,
        record: channel("c", info),
    };
    store
        .apply(&[
            seq(5),
            seq(4),
            put_channel("old"),
            Op::DeleteChannel { channel_id: 9 },
            put_channel("new"),
            put_outbox("s", 1, "old"),
            put_outbox("s", 1, "new"),
            put_history("c", 1, 10, "old"),
            put_history("c", 1, 11, "new"),
            put_history("c", 0, 5, "pruned"),
            Op::PruneHistory {
                client_id: "c".into(),
                below_seq: 1,
            },
            put_history("c", 2, 12, "after"),
        ])
        .expect("apply");
    let snapshot = store.load().expect("load");
    // The store keeps what it is given, even a seq that went down.
    assert_eq!(snapshot.client_seqs, [("c".to_owned(), 4)]);
    assert_eq!(snapshot.channels, [(9, channel("c", "new"))]);
    assert_eq!(
        snapshot.outboxes,
        [("s".to_owned(), vec![(1, Bytes::from_static(b"new"))])]
    );
    assert_eq!(
        full_history(&mut store, "c"),
        [entry(1, 11, "new"), entry(2, 12, "after")]
    );
}
