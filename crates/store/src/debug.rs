//! The hand-written `Debug` of [`Op`] and [`Snapshot`].
//!
//! Outbox and history payloads may carry user data (an `outflow` rule forwards message payloads
//! to sinks), and logs show the length of a payload only, as [`crate::StoredMessage`] does.
//! Everything else prints as `#[derive(Debug)]` would.

use std::fmt;

use bytes::Bytes;

use crate::{CredentialRecord, Op, Snapshot};

/// Prints the length of a payload, not its bytes.
struct Len<'a>(&'a Bytes);

impl fmt::Debug for Len<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// Prints outboxes as `[(sink, [(id, <n bytes>), ...]), ...]`.
struct Outboxes<'a>(&'a [(String, Vec<(u64, Bytes)>)]);

impl fmt::Debug for Outboxes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(sink, entries)| {
                let entries: Vec<(u64, Len<'_>)> = entries
                    .iter()
                    .map(|(id, payload)| (*id, Len(payload)))
                    .collect();
                (sink, entries)
            }))
            .finish()
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::PutSession { client_id, record } => f
                .debug_struct("PutSession")
                .field("client_id", client_id)
                .field("record", record)
                .finish(),
            Op::DeleteSession { client_id } => f
                .debug_struct("DeleteSession")
                .field("client_id", client_id)
                .finish(),
            Op::PutReleased { client_id, seq } => f
                .debug_struct("PutReleased")
                .field("client_id", client_id)
                .field("seq", seq)
                .finish(),
            Op::PutIncomingQos2 {
                client_id,
                packet_id,
            } => f
                .debug_struct("PutIncomingQos2")
                .field("client_id", client_id)
                .field("packet_id", packet_id)
                .finish(),
            Op::DeleteIncomingQos2 {
                client_id,
                packet_id,
            } => f
                .debug_struct("DeleteIncomingQos2")
                .field("client_id", client_id)
                .field("packet_id", packet_id)
                .finish(),
            Op::Enqueue {
                client_id,
                seq,
                message,
            } => f
                .debug_struct("Enqueue")
                .field("client_id", client_id)
                .field("seq", seq)
                .field("message", message)
                .finish(),
            Op::Dequeue { client_id, seq } => f
                .debug_struct("Dequeue")
                .field("client_id", client_id)
                .field("seq", seq)
                .finish(),
            Op::PutRetained { message } => f
                .debug_struct("PutRetained")
                .field("message", message)
                .finish(),
            Op::DeleteRetained { topic } => f
                .debug_struct("DeleteRetained")
                .field("topic", topic)
                .finish(),
            Op::PutClientSeq { client_id, seq } => f
                .debug_struct("PutClientSeq")
                .field("client_id", client_id)
                .field("seq", seq)
                .finish(),
            Op::PutChannel { channel_id, record } => f
                .debug_struct("PutChannel")
                .field("channel_id", channel_id)
                .field("record", record)
                .finish(),
            Op::DeleteChannel { channel_id } => f
                .debug_struct("DeleteChannel")
                .field("channel_id", channel_id)
                .finish(),
            Op::PutOutbox { sink, id, payload } => f
                .debug_struct("PutOutbox")
                .field("sink", sink)
                .field("id", id)
                .field("payload", &Len(payload))
                .finish(),
            Op::DeleteOutbox { sink, id } => f
                .debug_struct("DeleteOutbox")
                .field("sink", sink)
                .field("id", id)
                .finish(),
            Op::PutHistory {
                client_id,
                seq,
                time_ms,
                payload,
            } => f
                .debug_struct("PutHistory")
                .field("client_id", client_id)
                .field("seq", seq)
                .field("time_ms", time_ms)
                .field("payload", &Len(payload))
                .finish(),
            Op::PruneHistory {
                client_id,
                below_seq,
            } => f
                .debug_struct("PruneHistory")
                .field("client_id", client_id)
                .field("below_seq", below_seq)
                .finish(),
            // A token is a bearer secret: only its length shows.
            Op::PutToken { token, record } => f
                .debug_struct("PutToken")
                .field("token", &Redacted(token.len()))
                .field("record", record)
                .finish(),
            Op::DeleteToken { token } => f
                .debug_struct("DeleteToken")
                .field("token", &Redacted(token.len()))
                .finish(),
            Op::PutCredential { client_id, record } => f
                .debug_struct("PutCredential")
                .field("client_id", client_id)
                .field("record", record)
                .finish(),
            Op::DeleteCredential { client_id } => f
                .debug_struct("DeleteCredential")
                .field("client_id", client_id)
                .finish(),
        }
    }
}

/// Prints a secret's length, not its characters.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<REDACTED {} chars>", self.0)
    }
}

impl fmt::Debug for CredentialRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialRecord")
            .field("key_id", &self.key_id)
            .field("secret", &Redacted(self.secret.len()))
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("sessions", &self.sessions)
            .field("queues", &self.queues)
            .field("retained", &self.retained)
            .field("next_seq", &self.next_seq)
            .field("client_seqs", &self.client_seqs)
            .field("channels", &self.channels)
            .field("outboxes", &Outboxes(&self.outboxes))
            .field("next_outbox_id", &self.next_outbox_id)
            .field("tokens", &self.tokens.len())
            .field("credentials", &self.credentials)
            .field("incoming_qos2", &self.incoming_qos2)
            .field("released", &self.released)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_show_their_length_only() {
        let secret = Bytes::from_static(b"secret-bytes");
        let ops = [
            Op::PutOutbox {
                sink: "hook".into(),
                id: 3,
                payload: secret.clone(),
            },
            Op::PutHistory {
                client_id: "c".into(),
                seq: 1,
                time_ms: 2,
                payload: secret.clone(),
            },
        ];
        for op in &ops {
            let shown = format!("{op:?}");
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains("<12 bytes>"), "{shown}");
        }
        let token = Op::PutToken {
            token: "secret-token".into(),
            record: crate::TokenRecord {
                resources: vec!["a/#".into()],
                actions: 3,
                expire_at_ms: 1,
            },
        };
        let credential = Op::PutCredential {
            client_id: "c".into(),
            record: CredentialRecord {
                key_id: "key".into(),
                secret: "secret-credential".into(),
                created_at_ms: 1,
            },
        };
        for op in [token, credential] {
            let shown = format!("{op:?}");
            assert!(!shown.contains("secret-"), "{shown}");
        }
        let snapshot = Snapshot {
            outboxes: vec![("hook".into(), vec![(3, secret)])],
            ..Snapshot::default()
        };
        let shown = format!("{snapshot:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains(r#"outboxes: [("hook", [(3, <12 bytes>)])]"#),
            "{shown}"
        );
    }

    #[test]
    fn other_fields_print_as_derived() {
        let op = Op::Dequeue {
            client_id: "c".into(),
            seq: 7,
        };
        assert_eq!(format!("{op:?}"), r#"Dequeue { client_id: "c", seq: 7 }"#);
        assert_eq!(
            format!("{:?}", Snapshot::default()),
            "Snapshot { sessions: [], queues: [], retained: [], next_seq: 0, client_seqs: [], \
             channels: [], outboxes: [], next_outbox_id: 0, tokens: 0, credentials: [], \
             incoming_qos2: [], released: [] }"
        );
    }
}
