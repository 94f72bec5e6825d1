//! Conformance tests of the token and device-credential ops.

use crate::{CredentialRecord, Op, Store, TokenRecord};

use super::Fresh;

fn token(resources: &[&str], actions: u8, expire_at_ms: u64) -> TokenRecord {
    TokenRecord {
        resources: resources.iter().map(|r| (*r).to_owned()).collect(),
        actions,
        expire_at_ms,
    }
}

fn credential(key_id: &str, secret: &str) -> CredentialRecord {
    CredentialRecord {
        key_id: key_id.to_owned(),
        secret: secret.to_owned(),
        created_at_ms: 1_700_000_000_000,
    }
}

fn put_token(name: &str, record: TokenRecord) -> Op {
    Op::PutToken {
        token: name.to_owned(),
        record,
    }
}

fn put_credential(client: &str, record: CredentialRecord) -> Op {
    Op::PutCredential {
        client_id: client.to_owned(),
        record,
    }
}

pub(crate) fn tokens_and_credentials_are_kept_by_key<S: Store, G>(fresh: impl Fresh<S, G>) {
    let (mut store, _guard) = fresh();
    let batch = [
        put_token("t2", token(&["a/#"], 1, 10)),
        put_token("t1", token(&["b/+", "c"], 3, 20)),
        put_token("t3", token(&[], 2, 30)),
        Op::DeleteToken { token: "t3".into() },
        // A later put replaces the earlier one.
        put_token("t2", token(&["a/x"], 2, 11)),
        put_credential("GID_a@@@d1", credential("k1", "s1")),
        put_credential("GID_a@@@d2", credential("k2", "s2")),
        put_credential("GID_a@@@d1", credential("k1", "s1-refreshed")),
        Op::DeleteCredential {
            client_id: "GID_a@@@d2".into(),
        },
        // Deleting what is not there is a no-op.
        Op::DeleteToken {
            token: "never".into(),
        },
        Op::DeleteCredential {
            client_id: "never".into(),
        },
    ];
    store.apply(&batch).expect("apply");
    store.apply(&batch).expect("apply again");
    let snapshot = store.load().expect("load");
    assert_eq!(
        snapshot.tokens,
        vec![
            ("t1".to_owned(), token(&["b/+", "c"], 3, 20)),
            ("t2".to_owned(), token(&["a/x"], 2, 11)),
        ]
    );
    assert_eq!(
        snapshot.credentials,
        vec![("GID_a@@@d1".to_owned(), credential("k1", "s1-refreshed"))]
    );
    // Nothing else moved.
    assert!(snapshot.sessions.is_empty() && snapshot.queues.is_empty());
    assert_eq!((snapshot.next_seq, snapshot.next_outbox_id), (0, 0));
    store
        .apply(&[
            Op::DeleteToken { token: "t1".into() },
            Op::DeleteCredential {
                client_id: "GID_a@@@d1".into(),
            },
        ])
        .expect("apply");
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.tokens.len(), 1);
    assert!(snapshot.credentials.is_empty());
}
