//! Reading a [`crate::RedbStore`] back: the [`Snapshot`] of start-up and the presence history
//! query. The tables and their keys are described in `redb_store`, which owns them.
//!
//! A value that does not decode is a [`StoreError::Corrupt`] naming the file, the table and the
//! key, never a panic and never skipped.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;

use bytes::Bytes;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
};

use crate::codec::{self, DecodeError};
use crate::error::EngineContext;
use crate::redb_store::{
    CHANNELS, CLIENT_SEQS, CREDENTIALS, HISTORY, INCOMING_QOS2, KEY_NEXT_OUTBOX_ID, KEY_NEXT_SEQ,
    META, OUTBOX, QUEUE, RELEASED, RETAINED, SESSIONS, TOKENS,
};
use crate::{Snapshot, StoreError};

/// Reads every table but `history` in one read transaction.
pub(crate) fn load(db: &Database, path: &Path) -> Result<Snapshot, StoreError> {
    let txn = db.begin_read().at(path, "reading")?;
    let mut snapshot = Snapshot::default();
    load_mqtt(&txn, path, &mut snapshot)?;
    load_presence(&txn, path, &mut snapshot)?;
    load_auth(&txn, path, &mut snapshot)?;
    Ok(snapshot)
}

/// Returns the history entries of `client_id` seen within `times`, in seq order, at most
/// `limit` of them.
pub(crate) fn history(
    db: &Database,
    path: &Path,
    client_id: &str,
    times: RangeInclusive<u64>,
    limit: usize,
) -> Result<Vec<(u64, u64, Bytes)>, StoreError> {
    let mut found = Vec::new();
    if limit == 0 || times.is_empty() {
        return Ok(found);
    }
    let txn = db.begin_read().at(path, "reading")?;
    let table = txn.open_table(HISTORY).at(path, "opening table history")?;
    // A client's history is bounded by pruning, so scanning all of it is cheap enough; times
    // are not an index because a clock step can make them go backwards.
    let entries = table
        .range((client_id, 0)..=(client_id, u64::MAX))
        .at(path, "reading the history")?;
    for entry in entries {
        let (key, value) = entry.at(path, "reading the history")?;
        let (_, seq) = key.value();
        let (time_ms, payload) = codec::decode_history_entry(value.value())
            .map_err(|e| corrupt(path, "history", &key.value(), e))?;
        if times.contains(&time_ms) {
            found.push((seq, time_ms, payload));
            if found.len() == limit {
                break;
            }
        }
    }
    Ok(found)
}

/// The payloads of the history entries `wanted`, in that order, `None` where there is none;
/// one read transaction for all of them.
pub(crate) fn history_entries(
    db: &Database,
    path: &Path,
    wanted: &[(String, u64)],
) -> Result<Vec<Option<Bytes>>, StoreError> {
    let txn = db.begin_read().at(path, "reading")?;
    let table = txn.open_table(HISTORY).at(path, "opening table history")?;
    let mut found = Vec::with_capacity(wanted.len());
    for (client_id, seq) in wanted {
        let key = (client_id.as_str(), *seq);
        let payload = match table.get(key).at(path, "reading the history")? {
            Some(value) => {
                let (_, payload) = codec::decode_history_entry(value.value())
                    .map_err(|e| corrupt(path, "history", &key, e))?;
                Some(payload)
            }
            None => None,
        };
        found.push(payload);
    }
    Ok(found)
}

fn corrupt(path: &Path, table: &str, key: &dyn fmt::Debug, error: DecodeError) -> StoreError {
    StoreError::Corrupt(format!(
        "{}: table {table}, key {key:?}: {error}",
        path.display()
    ))
}

/// Sessions, queues, retained messages, QoS 2 ids awaiting PUBREL, released marks and
/// `next_seq`.
fn load_mqtt(
    txn: &ReadTransaction,
    path: &Path,
    snapshot: &mut Snapshot,
) -> Result<(), StoreError> {
    let sessions = txn
        .open_table(SESSIONS)
        .at(path, "opening table sessions")?;
    for entry in sessions.iter().at(path, "reading sessions")? {
        let (key, value) = entry.at(path, "reading sessions")?;
        let record = codec::decode_session(value.value())
            .map_err(|e| corrupt(path, "sessions", &key.value(), e))?;
        snapshot.sessions.push((key.value().to_owned(), record));
    }

    let queue = txn.open_table(QUEUE).at(path, "opening table queue")?;
    let mut largest_seq = None;
    for entry in queue.iter().at(path, "reading the queue")? {
        let (key, value) = entry.at(path, "reading the queue")?;
        let (client_id, seq) = key.value();
        let message = codec::decode_message(value.value())
            .map_err(|e| corrupt(path, "queue", &key.value(), e))?;
        largest_seq = largest_seq.max(Some(seq));
        push_grouped(&mut snapshot.queues, client_id, (seq, message));
    }

    let retained = txn
        .open_table(RETAINED)
        .at(path, "opening table retained")?;
    for entry in retained.iter().at(path, "reading retained messages")? {
        let (key, value) = entry.at(path, "reading retained messages")?;
        let message = codec::decode_message(value.value())
            .map_err(|e| corrupt(path, "retained", &key.value(), e))?;
        snapshot.retained.push(message);
    }

    snapshot.incoming_qos2 = grouped_keys(txn, path, INCOMING_QOS2)?;
    snapshot.released = grouped_keys(txn, path, RELEASED)?;

    // next_seq is written with every Enqueue; the max is only a guard against a future bug.
    snapshot.next_seq = counter(txn, path, KEY_NEXT_SEQ)?.max(one_past(largest_seq));
    Ok(())
}

/// Client seqs, channels, outboxes and `next_outbox_id`.
fn load_presence(
    txn: &ReadTransaction,
    path: &Path,
    snapshot: &mut Snapshot,
) -> Result<(), StoreError> {
    let client_seqs = txn
        .open_table(CLIENT_SEQS)
        .at(path, "opening table client_seqs")?;
    for entry in client_seqs.iter().at(path, "reading client seqs")? {
        let (key, value) = entry.at(path, "reading client seqs")?;
        snapshot
            .client_seqs
            .push((key.value().to_owned(), value.value()));
    }

    let channels = txn
        .open_table(CHANNELS)
        .at(path, "opening table channels")?;
    for entry in channels.iter().at(path, "reading channels")? {
        let (key, value) = entry.at(path, "reading channels")?;
        let record = codec::decode_channel(value.value())
            .map_err(|e| corrupt(path, "channels", &key.value(), e))?;
        snapshot.channels.push((key.value(), record));
    }

    let outbox = txn.open_table(OUTBOX).at(path, "opening table outbox")?;
    let mut largest_id = None;
    for entry in outbox.iter().at(path, "reading the outboxes")? {
        let (key, value) = entry.at(path, "reading the outboxes")?;
        let (sink, id) = key.value();
        let payload = codec::decode_outbox_entry(value.value())
            .map_err(|e| corrupt(path, "outbox", &key.value(), e))?;
        largest_id = largest_id.max(Some(id));
        push_grouped(&mut snapshot.outboxes, sink, (id, payload));
    }

    // As for next_seq: written with every PutOutbox, the max is a guard.
    snapshot.next_outbox_id = counter(txn, path, KEY_NEXT_OUTBOX_ID)?.max(one_past(largest_id));
    Ok(())
}

/// [`crate::Store::last_events`]: the last key of the first client's range, then the first key
/// past that range names the next client, and so on.
pub(crate) fn last_events(
    db: &Database,
    path: &Path,
    each: &mut crate::OnLastEvent<'_>,
) -> Result<(), StoreError> {
    let txn = db.begin_read().at(path, "reading")?;
    let table = txn.open_table(HISTORY).at(path, "opening table history")?;
    let mut next = table.first().at(path, "reading the history")?;
    while let Some((first, _)) = next {
        let client = first.value().0.to_owned();
        drop(first);
        let newest = table
            .range((client.as_str(), 0)..=(client.as_str(), u64::MAX))
            .at(path, "reading the history")?
            .next_back()
            .transpose()
            .at(path, "reading the history")?;
        if let Some((key, value)) = newest {
            let seq = key.value().1;
            match codec::decode_history_entry(value.value()) {
                Ok((time_ms, payload)) => each(&client, seq, time_ms, &payload),
                Err(e) => {
                    // Its seq is in the key: kept, so that the client's next event does not
                    // reuse it. The history query names the entry if it is asked for.
                    tracing::warn!(path = %path.display(), client_id = %client, seq, error = %e, "the newest history entry of a client does not decode; only its seq is kept");
                    each(&client, seq, 0, &[]);
                }
            }
        }
        next = table
            .range::<(&str, u64)>((
                std::ops::Bound::Excluded((client.as_str(), u64::MAX)),
                std::ops::Bound::Unbounded,
            ))
            .at(path, "reading the history")?
            .next()
            .transpose()
            .at(path, "reading the history")?;
    }
    Ok(())
}

/// Tokens and device credentials.
fn load_auth(
    txn: &ReadTransaction,
    path: &Path,
    snapshot: &mut Snapshot,
) -> Result<(), StoreError> {
    let tokens = txn.open_table(TOKENS).at(path, "opening table tokens")?;
    for entry in tokens.iter().at(path, "reading tokens")? {
        let (key, value) = entry.at(path, "reading tokens")?;
        // The key is a secret: an error names the table only.
        let record = codec::decode_token(value.value())
            .map_err(|e| corrupt(path, "tokens", &"<token>", e))?;
        snapshot.tokens.push((key.value().to_owned(), record));
    }
    let credentials = txn
        .open_table(CREDENTIALS)
        .at(path, "opening table credentials")?;
    for entry in credentials.iter().at(path, "reading credentials")? {
        let (key, value) = entry.at(path, "reading credentials")?;
        let record = codec::decode_credential(value.value())
            .map_err(|e| corrupt(path, "credentials", &key.value(), e))?;
        snapshot.credentials.push((key.value().to_owned(), record));
    }
    Ok(())
}

/// The keys of a `(client id, n)` → `()` table, grouped by client id, in key order.
fn grouped_keys<N>(
    txn: &ReadTransaction,
    path: &Path,
    table: TableDefinition<(&'static str, N), ()>,
) -> Result<Vec<(String, Vec<N>)>, StoreError>
where
    N: redb::Key + for<'a> redb::Value<SelfType<'a> = N> + 'static,
{
    let reading = format!("reading table {}", table.name());
    let table = txn.open_table(table).at(path, &reading)?;
    let mut groups: Vec<(String, Vec<N>)> = Vec::new();
    for entry in table.iter().at(path, &reading)? {
        let (key, _) = entry.at(path, &reading)?;
        let (client, n) = key.value();
        push_grouped(&mut groups, client, n);
    }
    Ok(groups)
}

fn counter(txn: &ReadTransaction, path: &Path, key: &str) -> Result<u64, StoreError> {
    let meta = txn.open_table(META).at(path, "opening table meta")?;
    let value = meta.get(key).at(path, "reading a counter")?;
    Ok(value.map_or(0, |guard| guard.value()))
}

fn one_past(largest: Option<u64>) -> u64 {
    largest.map_or(0, |n| n.saturating_add(1))
}

/// Appends to the last group if it has this key, or starts a new group: the tables iterate
/// grouped by their first key field (client id or sink id).
fn push_grouped<T>(groups: &mut Vec<(String, Vec<T>)>, key: &str, item: T) {
    match groups.last_mut() {
        Some((last, items)) if last == key => items.push(item),
        _ => groups.push((key.to_owned(), vec![item])),
    }
}
