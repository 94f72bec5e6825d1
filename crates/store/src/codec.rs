//! The binary encoding of stored values and of write-ahead log batches.
//!
//! Owns the byte layout of a [`StoredMessage`], a [`SessionRecord`], a [`ChannelRecord`], an
//! outbox entry, a history entry, a token and a device credential record, and a batch of
//! [`Op`]s. Keys are not encoded here: redb orders
//! them itself (see `redb_store`). Each encoded value starts with a version byte, so a later
//! layout can be read next to this one. Integers are big-endian; strings and byte strings are a
//! `u32` length followed by the bytes.
//!
//! A batch is a count and then ops, each a tag byte and its fields. New kinds of op get new tags
//! under the same layout version, so every batch an earlier Herald wrote (tags 1 to 6) still
//! decodes (tags 7 to 13 came with presence, 14 to 17 with tokens and device credentials, 18 to
//! 20 with the QoS 2 ids and released marks that keep QoS 2 exactly once across a crash); a tag
//! this Herald does not know is an error, never skipped.
//!
//! Decoding never trusts a length: a truncated or garbage input gives a [`DecodeError`], never a
//! panic or a large allocation. Trailing bytes are an error too.

use std::fmt;

use bytes::Bytes;

use crate::{ChannelRecord, CredentialRecord, Op, SessionRecord, StoredMessage, TokenRecord};

/// The layout version written in front of every value and batch.
const LAYOUT_VERSION: u8 = 1;

const TAG_PUT_SESSION: u8 = 1;
const TAG_DELETE_SESSION: u8 = 2;
const TAG_ENQUEUE: u8 = 3;
const TAG_DEQUEUE: u8 = 4;
const TAG_PUT_RETAINED: u8 = 5;
const TAG_DELETE_RETAINED: u8 = 6;
const TAG_PUT_CLIENT_SEQ: u8 = 7;
const TAG_PUT_CHANNEL: u8 = 8;
const TAG_DELETE_CHANNEL: u8 = 9;
const TAG_PUT_OUTBOX: u8 = 10;
const TAG_DELETE_OUTBOX: u8 = 11;
const TAG_PUT_HISTORY: u8 = 12;
const TAG_PRUNE_HISTORY: u8 = 13;
const TAG_PUT_TOKEN: u8 = 14;
const TAG_DELETE_TOKEN: u8 = 15;
const TAG_PUT_CREDENTIAL: u8 = 16;
const TAG_DELETE_CREDENTIAL: u8 = 17;
const TAG_PUT_INCOMING_QOS2: u8 = 18;
const TAG_DELETE_INCOMING_QOS2: u8 = 19;
const TAG_PUT_RELEASED: u8 = 20;

/// Why bytes could not be decoded. The caller adds which file and key they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string or byte string too long for its `u32` length prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TooLarge(pub(crate) usize);

pub(crate) fn encode_message(message: &StoredMessage) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(32 + message.topic.len() + message.payload.len());
    out.push(LAYOUT_VERSION);
    put_message(&mut out, message)?;
    Ok(out)
}

pub(crate) fn decode_message(bytes: &[u8]) -> Result<StoredMessage, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let message = reader.message()?;
    reader.finish()?;
    Ok(message)
}

pub(crate) fn encode_session(record: &SessionRecord) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(16 + 32 * record.subscriptions.len());
    out.push(LAYOUT_VERSION);
    put_session(&mut out, record)?;
    Ok(out)
}

pub(crate) fn decode_session(bytes: &[u8]) -> Result<SessionRecord, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let record = reader.session()?;
    reader.finish()?;
    Ok(record)
}

pub(crate) fn encode_channel(record: &ChannelRecord) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(9 + record.client_id.len() + record.info.len());
    out.push(LAYOUT_VERSION);
    put_channel(&mut out, record)?;
    Ok(out)
}

pub(crate) fn decode_channel(bytes: &[u8]) -> Result<ChannelRecord, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let record = reader.channel()?;
    reader.finish()?;
    Ok(record)
}

/// An outbox entry: the payload alone.
pub(crate) fn encode_outbox_entry(payload: &[u8]) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(LAYOUT_VERSION);
    put_bytes(&mut out, payload)?;
    Ok(out)
}

pub(crate) fn decode_outbox_entry(bytes: &[u8]) -> Result<Bytes, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let payload = Bytes::copy_from_slice(reader.bytes("payload")?);
    reader.finish()?;
    Ok(payload)
}

/// A history entry: the time the event was seen and its payload.
pub(crate) fn encode_history_entry(time_ms: u64, payload: &[u8]) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(13 + payload.len());
    out.push(LAYOUT_VERSION);
    out.extend_from_slice(&time_ms.to_be_bytes());
    put_bytes(&mut out, payload)?;
    Ok(out)
}

/// Returns the time and the payload of a history entry.
pub(crate) fn decode_history_entry(bytes: &[u8]) -> Result<(u64, Bytes), DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let time_ms = reader.u64("event time")?;
    let payload = Bytes::copy_from_slice(reader.bytes("payload")?);
    reader.finish()?;
    Ok((time_ms, payload))
}

pub(crate) fn encode_token(record: &TokenRecord) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(16 + 32 * record.resources.len());
    out.push(LAYOUT_VERSION);
    put_token(&mut out, record)?;
    Ok(out)
}

pub(crate) fn decode_token(bytes: &[u8]) -> Result<TokenRecord, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let record = reader.token()?;
    reader.finish()?;
    Ok(record)
}

pub(crate) fn encode_credential(record: &CredentialRecord) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(17 + record.key_id.len() + record.secret.len());
    out.push(LAYOUT_VERSION);
    put_credential(&mut out, record)?;
    Ok(out)
}

pub(crate) fn decode_credential(bytes: &[u8]) -> Result<CredentialRecord, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let record = reader.credential()?;
    reader.finish()?;
    Ok(record)
}

pub(crate) fn encode_batch(ops: &[Op]) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(64 * ops.len() + 8);
    out.push(LAYOUT_VERSION);
    put_len(&mut out, ops.len())?;
    for op in ops {
        put_op(&mut out, op)?;
    }
    Ok(out)
}

pub(crate) fn decode_batch(bytes: &[u8]) -> Result<Vec<Op>, DecodeError> {
    let mut reader = Reader::new(bytes);
    reader.version()?;
    let count = reader.u32()? as usize;
    // Each op takes at least 5 bytes, so a garbage count cannot make us reserve much.
    let mut ops = Vec::with_capacity(count.min(reader.remaining() / 5));
    for _ in 0..count {
        ops.push(reader.op()?);
    }
    reader.finish()?;
    Ok(ops)
}

/// A tag, a string key and a fixed-size number: the shape most ops share.
fn put_keyed(out: &mut Vec<u8>, tag: u8, key: &str, number: &[u8]) -> Result<(), TooLarge> {
    out.push(tag);
    put_str(out, key)?;
    out.extend_from_slice(number);
    Ok(())
}

fn put_op(out: &mut Vec<u8>, op: &Op) -> Result<(), TooLarge> {
    match op {
        Op::PutSession { client_id, record } => {
            out.push(TAG_PUT_SESSION);
            put_str(out, client_id)?;
            put_session(out, record)
        }
        Op::DeleteSession { client_id } => {
            out.push(TAG_DELETE_SESSION);
            put_str(out, client_id)
        }
        Op::PutIncomingQos2 {
            client_id,
            packet_id,
        } => put_keyed(
            out,
            TAG_PUT_INCOMING_QOS2,
            client_id,
            &packet_id.to_be_bytes(),
        ),
        Op::DeleteIncomingQos2 {
            client_id,
            packet_id,
        } => put_keyed(
            out,
            TAG_DELETE_INCOMING_QOS2,
            client_id,
            &packet_id.to_be_bytes(),
        ),
        Op::Enqueue {
            client_id,
            seq,
            message,
        } => {
            put_keyed(out, TAG_ENQUEUE, client_id, &seq.to_be_bytes())?;
            put_message(out, message)
        }
        Op::Dequeue { client_id, seq } => {
            put_keyed(out, TAG_DEQUEUE, client_id, &seq.to_be_bytes())
        }
        Op::PutReleased { client_id, seq } => {
            put_keyed(out, TAG_PUT_RELEASED, client_id, &seq.to_be_bytes())
        }
        Op::PutRetained { message } => {
            out.push(TAG_PUT_RETAINED);
            put_message(out, message)
        }
        Op::DeleteRetained { topic } => {
            out.push(TAG_DELETE_RETAINED);
            put_str(out, topic)
        }
        Op::PutClientSeq { client_id, seq } => {
            put_keyed(out, TAG_PUT_CLIENT_SEQ, client_id, &seq.to_be_bytes())
        }
        Op::PutChannel { channel_id, record } => {
            out.push(TAG_PUT_CHANNEL);
            out.extend_from_slice(&channel_id.to_be_bytes());
            put_channel(out, record)
        }
        Op::DeleteChannel { channel_id } => {
            out.push(TAG_DELETE_CHANNEL);
            out.extend_from_slice(&channel_id.to_be_bytes());
            Ok(())
        }
        Op::PutOutbox { sink, id, payload } => {
            put_keyed(out, TAG_PUT_OUTBOX, sink, &id.to_be_bytes())?;
            put_bytes(out, payload)
        }
        Op::DeleteOutbox { sink, id } => put_keyed(out, TAG_DELETE_OUTBOX, sink, &id.to_be_bytes()),
        Op::PutHistory {
            client_id,
            seq,
            time_ms,
            payload,
        } => {
            put_keyed(out, TAG_PUT_HISTORY, client_id, &seq.to_be_bytes())?;
            out.extend_from_slice(&time_ms.to_be_bytes());
            put_bytes(out, payload)
        }
        Op::PruneHistory {
            client_id,
            below_seq,
        } => put_keyed(out, TAG_PRUNE_HISTORY, client_id, &below_seq.to_be_bytes()),
        Op::PutToken { token, record } => {
            out.push(TAG_PUT_TOKEN);
            put_str(out, token)?;
            put_token(out, record)
        }
        Op::DeleteToken { token } => {
            out.push(TAG_DELETE_TOKEN);
            put_str(out, token)
        }
        Op::PutCredential { client_id, record } => {
            out.push(TAG_PUT_CREDENTIAL);
            put_str(out, client_id)?;
            put_credential(out, record)
        }
        Op::DeleteCredential { client_id } => {
            out.push(TAG_DELETE_CREDENTIAL);
            put_str(out, client_id)
        }
    }
}

fn put_token(out: &mut Vec<u8>, record: &TokenRecord) -> Result<(), TooLarge> {
    out.push(record.actions);
    out.extend_from_slice(&record.expire_at_ms.to_be_bytes());
    put_len(out, record.resources.len())?;
    for resource in &record.resources {
        put_str(out, resource)?;
    }
    Ok(())
}

fn put_credential(out: &mut Vec<u8>, record: &CredentialRecord) -> Result<(), TooLarge> {
    put_str(out, &record.key_id)?;
    put_str(out, &record.secret)?;
    out.extend_from_slice(&record.created_at_ms.to_be_bytes());
    Ok(())
}

fn put_message(out: &mut Vec<u8>, message: &StoredMessage) -> Result<(), TooLarge> {
    put_str(out, &message.topic)?;
    put_bytes(out, &message.payload)?;
    out.push(message.qos);
    out.push(u8::from(message.retain));
    out.extend_from_slice(&message.published_at_ms.to_be_bytes());
    Ok(())
}

fn put_session(out: &mut Vec<u8>, record: &SessionRecord) -> Result<(), TooLarge> {
    out.extend_from_slice(&record.created_at_ms.to_be_bytes());
    put_len(out, record.subscriptions.len())?;
    for (filter, qos) in &record.subscriptions {
        put_str(out, filter)?;
        out.push(*qos);
    }
    Ok(())
}

fn put_channel(out: &mut Vec<u8>, record: &ChannelRecord) -> Result<(), TooLarge> {
    put_str(out, &record.client_id)?;
    put_bytes(out, &record.info)
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), TooLarge> {
    let len32 = u32::try_from(len).map_err(|_| TooLarge(len))?;
    out.extend_from_slice(&len32.to_be_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), TooLarge> {
    put_len(out, bytes.len())?;
    out.extend_from_slice(bytes);
    Ok(())
}

fn put_str(out: &mut Vec<u8>, text: &str) -> Result<(), TooLarge> {
    put_bytes(out, text.as_bytes())
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, offset: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn error(&self, what: &str) -> DecodeError {
        DecodeError(format!(
            "{what} at byte {} of {}",
            self.offset,
            self.bytes.len()
        ))
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(self.error(&format!("truncated {what} (needs {len} bytes)")));
        }
        let taken = &self.bytes[self.offset..self.offset + len];
        self.offset += len;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N, what)?);
        Ok(array)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array("length")?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn u128(&mut self, what: &str) -> Result<u128, DecodeError> {
        Ok(u128::from_be_bytes(self.array(what)?))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len, what)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let start = self.offset;
        let bytes = self.bytes(what)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(_) => Err(DecodeError(format!("{what} at byte {start} is not UTF-8"))),
        }
    }

    fn qos(&mut self) -> Result<u8, DecodeError> {
        let qos = self.u8("qos")?;
        if qos > 2 {
            return Err(self.error(&format!("qos {qos} out of range")));
        }
        Ok(qos)
    }

    fn version(&mut self) -> Result<(), DecodeError> {
        let version = self.u8("version byte")?;
        if version != LAYOUT_VERSION {
            return Err(DecodeError(format!(
                "unknown layout version {version} (this Herald writes {LAYOUT_VERSION})"
            )));
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(self.error(&format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }

    fn message(&mut self) -> Result<StoredMessage, DecodeError> {
        let topic = self.string("topic")?;
        let payload = Bytes::copy_from_slice(self.bytes("payload")?);
        let qos = self.qos()?;
        let retain = match self.u8("retain flag")? {
            0 => false,
            1 => true,
            other => return Err(self.error(&format!("retain flag {other} is not 0 or 1"))),
        };
        let published_at_ms = self.u64("publish time")?;
        Ok(StoredMessage {
            topic,
            payload,
            qos,
            retain,
            published_at_ms,
        })
    }

    fn session(&mut self) -> Result<SessionRecord, DecodeError> {
        let created_at_ms = self.u64("creation time")?;
        let count = self.u32()? as usize;
        // Each subscription takes at least 5 bytes.
        let mut subscriptions = Vec::with_capacity(count.min(self.remaining() / 5));
        for _ in 0..count {
            let filter = self.string("filter")?;
            let qos = self.qos()?;
            subscriptions.push((filter, qos));
        }
        Ok(SessionRecord {
            subscriptions,
            created_at_ms,
        })
    }

    fn channel(&mut self) -> Result<ChannelRecord, DecodeError> {
        Ok(ChannelRecord {
            client_id: self.string("client id")?,
            info: Bytes::copy_from_slice(self.bytes("channel info")?),
        })
    }

    fn token(&mut self) -> Result<TokenRecord, DecodeError> {
        let actions = self.u8("token actions")?;
        if actions == 0 || actions > 3 {
            return Err(self.error(&format!("token actions {actions} out of range")));
        }
        let expire_at_ms = self.u64("token expiry")?;
        let count = self.u32()? as usize;
        // Each resource takes at least 4 bytes.
        let mut resources = Vec::with_capacity(count.min(self.remaining() / 4));
        for _ in 0..count {
            resources.push(self.string("token resource")?);
        }
        Ok(TokenRecord {
            resources,
            actions,
            expire_at_ms,
        })
    }

    fn credential(&mut self) -> Result<CredentialRecord, DecodeError> {
        Ok(CredentialRecord {
            key_id: self.string("credential key id")?,
            secret: self.string("credential secret")?,
            created_at_ms: self.u64("credential creation time")?,
        })
    }

    fn op(&mut self) -> Result<Op, DecodeError> {
        let op = match self.u8("op tag")? {
            TAG_PUT_SESSION => Op::PutSession {
                client_id: self.string("client id")?,
                record: self.session()?,
            },
            TAG_DELETE_SESSION => Op::DeleteSession {
                client_id: self.string("client id")?,
            },
            TAG_PUT_INCOMING_QOS2 => Op::PutIncomingQos2 {
                client_id: self.string("client id")?,
                packet_id: self.u16("packet id")?,
            },
            TAG_DELETE_INCOMING_QOS2 => Op::DeleteIncomingQos2 {
                client_id: self.string("client id")?,
                packet_id: self.u16("packet id")?,
            },
            TAG_ENQUEUE => Op::Enqueue {
                client_id: self.string("client id")?,
                seq: self.u64("seq")?,
                message: self.message()?,
            },
            TAG_DEQUEUE => Op::Dequeue {
                client_id: self.string("client id")?,
                seq: self.u64("seq")?,
            },
            TAG_PUT_RELEASED => Op::PutReleased {
                client_id: self.string("client id")?,
                seq: self.u64("seq")?,
            },
            TAG_PUT_RETAINED => Op::PutRetained {
                message: self.message()?,
            },
            TAG_DELETE_RETAINED => Op::DeleteRetained {
                topic: self.string("topic")?,
            },
            TAG_PUT_CLIENT_SEQ => Op::PutClientSeq {
                client_id: self.string("client id")?,
                seq: self.u64("seq")?,
            },
            TAG_PUT_CHANNEL => Op::PutChannel {
                channel_id: self.u128("channel id")?,
                record: self.channel()?,
            },
            TAG_DELETE_CHANNEL => Op::DeleteChannel {
                channel_id: self.u128("channel id")?,
            },
            TAG_PUT_OUTBOX => Op::PutOutbox {
                sink: self.string("sink id")?,
                id: self.u64("outbox id")?,
                payload: Bytes::copy_from_slice(self.bytes("payload")?),
            },
            TAG_DELETE_OUTBOX => Op::DeleteOutbox {
                sink: self.string("sink id")?,
                id: self.u64("outbox id")?,
            },
            TAG_PUT_HISTORY => Op::PutHistory {
                client_id: self.string("client id")?,
                seq: self.u64("seq")?,
                time_ms: self.u64("event time")?,
                payload: Bytes::copy_from_slice(self.bytes("payload")?),
            },
            TAG_PRUNE_HISTORY => Op::PruneHistory {
                client_id: self.string("client id")?,
                below_seq: self.u64("seq")?,
            },
            TAG_PUT_TOKEN => Op::PutToken {
                token: self.string("token")?,
                record: self.token()?,
            },
            TAG_DELETE_TOKEN => Op::DeleteToken {
                token: self.string("token")?,
            },
            TAG_PUT_CREDENTIAL => Op::PutCredential {
                client_id: self.string("client id")?,
                record: self.credential()?,
            },
            TAG_DELETE_CREDENTIAL => Op::DeleteCredential {
                client_id: self.string("client id")?,
            },
            other => return Err(self.error(&format!("unknown op tag {other}"))),
        };
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &'static [u8]) -> StoredMessage {
        StoredMessage {
            topic: topic.to_owned(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain: true,
            published_at_ms: 1_700_000_000_123,
        }
    }

    fn every_op() -> Vec<Op> {
        vec![
            Op::PutSession {
                client_id: "GID@@@dev-1".into(),
                record: SessionRecord {
                    subscriptions: vec![("a/+".into(), 1), ("b/#".into(), 2)],
                    created_at_ms: 42,
                },
            },
            Op::DeleteSession {
                client_id: "gone".into(),
            },
            Op::PutIncomingQos2 {
                client_id: "GID@@@dev-1".into(),
                packet_id: u16::MAX,
            },
            Op::DeleteIncomingQos2 {
                client_id: "GID@@@dev-1".into(),
                packet_id: 1,
            },
            Op::Enqueue {
                client_id: "GID@@@dev-1".into(),
                seq: u64::MAX - 1,
                message: message("a/b", b"\x00\xffpayload"),
            },
            Op::Dequeue {
                client_id: "c".into(),
                seq: 7,
            },
            Op::PutReleased {
                client_id: "c".into(),
                seq: 8,
            },
            Op::PutRetained {
                message: message("r/é", b""),
            },
            Op::DeleteRetained {
                topic: "r/x".into(),
            },
            Op::PutClientSeq {
                client_id: "GID@@@dev-1".into(),
                seq: u64::MAX,
            },
            Op::PutChannel {
                channel_id: u128::MAX - 1,
                record: channel("GID@@@dev-1", b"{\"clientIp\":\"203.0.113.7:51514\"}"),
            },
            Op::DeleteChannel { channel_id: 1 },
            Op::PutOutbox {
                sink: "hook".into(),
                id: 1 << 40,
                payload: Bytes::from_static(b"\x00event\xff"),
            },
            Op::DeleteOutbox {
                sink: "".into(),
                id: 0,
            },
            Op::PutHistory {
                client_id: "c".into(),
                seq: 3,
                time_ms: 1_732_345_678_901,
                payload: Bytes::new(),
            },
            Op::PruneHistory {
                client_id: "c".into(),
                below_seq: 2,
            },
            Op::PutToken {
                token: "tok-1".into(),
                record: token(),
            },
            Op::DeleteToken {
                token: "tok-0".into(),
            },
            Op::PutCredential {
                client_id: "GID@@@dev-1".into(),
                record: credential(),
            },
            Op::DeleteCredential {
                client_id: "GID@@@dev-2".into(),
            },
        ]
    }

    fn token() -> TokenRecord {
        TokenRecord {
            resources: vec!["a/+".into(), "b/#".into()],
            actions: 3,
            expire_at_ms: 1_732_345_678_901,
        }
    }

    fn credential() -> CredentialRecord {
        CredentialRecord {
            key_id: "DK1".into(),
            secret: "s3cret".into(),
            created_at_ms: 7,
        }
    }

    fn channel(client_id: &str, info: &'static [u8]) -> ChannelRecord {
        ChannelRecord {
            client_id: client_id.to_owned(),
            info: Bytes::from_static(info),
        }
    }

    /// Whether one value decoder accepts some bytes.
    type Accepts = fn(&[u8]) -> bool;

    /// A value of each kind, with its decoder.
    fn every_value() -> Vec<(Vec<u8>, Accepts)> {
        let session = SessionRecord {
            subscriptions: vec![("x/#".into(), 0)],
            created_at_ms: 9,
        };
        vec![
            (
                encode_message(&message("t", b"xyz")).expect("encode"),
                |b| decode_message(b).is_ok(),
            ),
            (encode_session(&session).expect("encode"), |b| {
                decode_session(b).is_ok()
            }),
            (encode_channel(&channel("c", b"{}")).expect("encode"), |b| {
                decode_channel(b).is_ok()
            }),
            (encode_outbox_entry(b"event").expect("encode"), |b| {
                decode_outbox_entry(b).is_ok()
            }),
            (encode_history_entry(5, b"event").expect("encode"), |b| {
                decode_history_entry(b).is_ok()
            }),
            (encode_token(&token()).expect("encode"), |b| {
                decode_token(b).is_ok()
            }),
            (encode_credential(&credential()).expect("encode"), |b| {
                decode_credential(b).is_ok()
            }),
        ]
    }

    #[test]
    fn values_and_batches_round_trip() {
        let m = message("t/1", b"hello");
        assert_eq!(decode_message(&encode_message(&m).expect("encode")), Ok(m));
        let s = SessionRecord {
            subscriptions: vec![("x/#".into(), 0)],
            created_at_ms: 9,
        };
        assert_eq!(decode_session(&encode_session(&s).expect("encode")), Ok(s));
        let c = channel("GID@@@dev-1", b"{\"a\":1}");
        assert_eq!(decode_channel(&encode_channel(&c).expect("encode")), Ok(c));
        let payload = Bytes::from_static(b"\x00\x01");
        assert_eq!(
            decode_outbox_entry(&encode_outbox_entry(&payload).expect("encode")),
            Ok(payload.clone())
        );
        assert_eq!(
            decode_history_entry(&encode_history_entry(u64::MAX, &payload).expect("encode")),
            Ok((u64::MAX, payload))
        );
        let ops = every_op();
        assert_eq!(decode_batch(&encode_batch(&ops).expect("encode")), Ok(ops));
        assert_eq!(
            decode_batch(&encode_batch(&[]).expect("encode")),
            Ok(vec![])
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let batch = encode_batch(&every_op()).expect("encode");
        for len in 0..batch.len() {
            assert!(
                decode_batch(&batch[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
        for (value, accepts) in every_value() {
            assert!(accepts(&value), "{value:?}");
            for len in 0..value.len() {
                assert!(
                    !accepts(&value[..len]),
                    "prefix of {len} bytes of {value:?}"
                );
            }
        }
    }

    /// The bytes of batches are what a log left by an earlier run holds: they must keep
    /// decoding. Written out by hand from the layout, not produced by the encoder.
    #[test]
    fn the_batch_layout_does_not_change() {
        let older = [
            1, // layout version
            0, 0, 0, 2, // two ops
            2, 0, 0, 0, 1, b'c', // DeleteSession "c"
            4, 0, 0, 0, 1, b'c', 0, 0, 0, 0, 0, 0, 1, 0, // Dequeue "c" 256
        ];
        let older_ops = vec![
            Op::DeleteSession {
                client_id: "c".into(),
            },
            Op::Dequeue {
                client_id: "c".into(),
                seq: 256,
            },
        ];
        assert_eq!(decode_batch(&older), Ok(older_ops.clone()));
        assert_eq!(encode_batch(&older_ops).expect("encode"), older);

        let mut presence = vec![1, 0, 0, 0, 3];
        presence.push(9); // DeleteChannel, 16 bytes big-endian
        presence.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        presence.extend_from_slice(&[10, 0, 0, 0, 1, b's', 0, 0, 0, 0, 0, 0, 0, 7]); // PutOutbox
        presence.extend_from_slice(&[0, 0, 0, 2, b'h', b'i']);
        presence.extend_from_slice(&[13, 0, 0, 0, 1, b'c', 0, 0, 0, 0, 0, 0, 0, 5]); // Prune
        let presence_ops = vec![
            Op::DeleteChannel {
                channel_id: 0x0102_0304_0506_0708_090A_0B0C_0D0E_0F10,
            },
            Op::PutOutbox {
                sink: "s".into(),
                id: 7,
                payload: Bytes::from_static(b"hi"),
            },
            Op::PruneHistory {
                client_id: "c".into(),
                below_seq: 5,
            },
        ];
        assert_eq!(decode_batch(&presence), Ok(presence_ops.clone()));
        assert_eq!(encode_batch(&presence_ops).expect("encode"), presence);

        let auth = [1, 0, 0, 0, 1, 15, 0, 0, 0, 1, b't']; // DeleteToken "t"
        let auth_ops = vec![Op::DeleteToken { token: "t".into() }];
        assert_eq!(decode_batch(&auth), Ok(auth_ops.clone()));
        assert_eq!(encode_batch(&auth_ops).expect("encode"), auth);

        // PutIncomingQos2 "c" 0x0102, DeleteIncomingQos2 "c" 0xFFFF
        let qos2 = [
            1, 0, 0, 0, 2, 18, 0, 0, 0, 1, b'c', 1, 2, 19, 0, 0, 0, 1, b'c', 0xFF, 0xFF,
        ];
        let qos2_ops = vec![
            Op::PutIncomingQos2 {
                client_id: "c".into(),
                packet_id: 0x0102,
            },
            Op::DeleteIncomingQos2 {
                client_id: "c".into(),
                packet_id: u16::MAX,
            },
        ];
        assert_eq!(decode_batch(&qos2), Ok(qos2_ops.clone()));
        assert_eq!(encode_batch(&qos2_ops).expect("encode"), qos2);

        let released = [1, 0, 0, 0, 1, 20, 0, 0, 0, 1, b'c', 0, 0, 0, 0, 0, 0, 0, 8];
        let released_ops = vec![Op::PutReleased {
            client_id: "c".into(),
            seq: 8,
        }];
        assert_eq!(decode_batch(&released), Ok(released_ops.clone()));
        assert_eq!(encode_batch(&released_ops).expect("encode"), released);

        let error = decode_batch(&[1, 0, 0, 0, 1, 21]).expect_err("unknown tag");
        assert!(error.to_string().contains("unknown op tag 21"), "{error}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // A deterministic xorshift stream; every byte position also flipped in a valid batch.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in 0..200 {
            let garbage: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_batch(&garbage);
            for (_, accepts) in every_value() {
                let _ = accepts(&garbage);
            }
        }
        let batch = encode_batch(&every_op()).expect("encode");
        for i in 0..batch.len() {
            let mut flipped = batch.clone();
            flipped[i] ^= 0xA5;
            let _ = decode_batch(&flipped);
        }
        // Huge lengths and counts are refused without allocating.
        assert!(decode_batch(&[LAYOUT_VERSION, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(
            decode_session(&[
                LAYOUT_VERSION,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0xff,
                0xff,
                0xff,
                0xff
            ])
            .is_err()
        );
    }

    #[test]
    fn bad_fields_are_refused() {
        let mut bytes = encode_message(&message("t", b"p")).expect("encode");
        assert!(
            decode_message(&[&bytes[..], &[0]].concat()).is_err(),
            "trailing byte"
        );
        bytes[0] = 2;
        let error = decode_message(&bytes).expect_err("newer layout");
        assert!(error.to_string().contains("layout version 2"), "{error}");
        // qos is after version(1) + topic(4 + 1) + payload(4 + 1).
        let mut bytes = encode_message(&message("t", b"p")).expect("encode");
        bytes[11] = 3;
        assert!(decode_message(&bytes).is_err(), "qos 3");
        bytes[11] = 1;
        bytes[12] = 2;
        assert!(decode_message(&bytes).is_err(), "retain 2");
        let mut bytes = encode_message(&message("t", b"p")).expect("encode");
        bytes[5] = 0xff;
        assert!(decode_message(&bytes).is_err(), "topic not UTF-8");
    }

    #[test]
    fn debug_does_not_show_the_payload() {
        let shown = format!("{:?}", message("t", b"secret-bytes"));
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("payload_len: 12"), "{shown}");
    }
}
