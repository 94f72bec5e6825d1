//! Permissions of a connected client (DESIGN.md 3.4): access-key filter lists, declared parent
//! topics, P2P topics and the presence topics.

use std::sync::Arc;

use herald_protocol::ClientId;
use herald_protocol::topic::{covers, matches, p2p_target, parent_of};

use crate::AccessKey;

/// Topics that carry presence; only keys that list them may read them.
const PRESENCE_PREFIXES: [&str; 2] = ["$notice", "$presence"];

/// First levels that belong to the broker: no client publishes there.
const BROKER_PREFIXES: [&str; 3] = ["$SYS", "$notice", "$presence"];

/// What a connection is allowed by its credentials.
#[derive(Debug, Clone)]
pub enum Permissions {
    /// Anywhere, except other clients' P2P topics and the presence topics.
    Anonymous,
    /// The key's publish and subscribe filter lists.
    Key(Arc<AccessKey>),
}

/// An authenticated client: who it is and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client_id: ClientId,
    pub permissions: Permissions,
    parents: Arc<[String]>,
}

impl Principal {
    pub fn new(client_id: ClientId, permissions: Permissions, parents: Arc<[String]>) -> Principal {
        Principal {
            client_id,
            permissions,
            parents,
        }
    }

    /// The access key id, when the client authenticated with one.
    pub fn access_key(&self) -> Option<&str> {
        match &self.permissions {
            Permissions::Key(key) => Some(&key.id),
            Permissions::Anonymous => None,
        }
    }

    fn parent_declared(&self, topic_or_filter: &str) -> bool {
        let parent = parent_of(topic_or_filter);
        self.parents.is_empty()
            || parent == "+"
            || parent == "#"
            || parent.starts_with('$')
            || self.parents.iter().any(|p| p == parent)
    }

    /// Whether this client may publish on `topic` (a valid topic name). The broker's own
    /// `$SYS`, `$notice` and `$presence` topics are never writable; other `$` topics are
    /// writable by anonymous clients and by keys that list them explicitly (a leading wildcard
    /// does not reach them).
    pub fn can_publish(&self, topic: &str) -> bool {
        if BROKER_PREFIXES.contains(&parent_of(topic)) || !self.parent_declared(topic) {
            return false;
        }
        match &self.permissions {
            Permissions::Anonymous => true,
            Permissions::Key(key) => key.publish.iter().any(|f| matches(f, topic)),
        }
    }

    /// Whether this client may subscribe to `filter` (a valid filter).
    pub fn can_subscribe(&self, filter: &str) -> bool {
        if !self.parent_declared(filter) || self.names_foreign_p2p(filter) {
            return false;
        }
        match &self.permissions {
            Permissions::Anonymous => !PRESENCE_PREFIXES.contains(&parent_of(filter)),
            Permissions::Key(key) => key.subscribe.iter().any(|f| covers(f, filter)),
        }
    }

    /// A filter whose second level is `p2p` reaches P2P topics; only the client's own is allowed.
    fn names_foreign_p2p(&self, filter: &str) -> bool {
        let mut levels = filter.split('/');
        let _parent = levels.next();
        if levels.next() != Some("p2p") {
            return false;
        }
        match levels.next() {
            None => false,
            Some(target) => target != self.client_id.as_str() || p2p_target(filter).is_none(),
        }
    }
}
