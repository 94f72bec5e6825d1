//! Permissions of a connected client (DESIGN.md 3.4): access-key filter lists, token grants,
//! device credentials, declared parent topics, P2P topics and the presence topics.

use std::sync::Arc;

use herald_protocol::ClientId;
use herald_protocol::topic::{covers, matches, p2p_target, parent_of};

use crate::registry::{Actions, AuthRegistry, TokenGrant};
use crate::{AccessKey, Secret};

/// The one topic a token-mode client publishes to refresh its tokens (DESIGN.md 3.2).
pub const UPLOAD_TOKEN_TOPIC: &str = "$SYS/uploadToken";

/// A token a connection presented, with the type it was presented as (`R`, `W`, `RW`; never
/// more than the token grants).
#[derive(Debug, Clone)]
pub struct HeldToken {
    pub token: Secret,
    pub used_as: Actions,
    pub grant: Arc<TokenGrant>,
}

/// Topics that carry presence; only keys that list them may read them.
const PRESENCE_PREFIXES: [&str; 2] = ["$notice", "$presence"];

/// First levels that belong to the broker: no client publishes there.
const BROKER_PREFIXES: [&str; 3] = ["$SYS", "$notice", "$presence"];

/// Whether `topic`'s first level belongs to the broker (`$SYS`, `$notice`, `$presence`):
/// nobody publishes there from outside, neither a client nor the admin API.
pub fn is_broker_topic(topic: &str) -> bool {
    BROKER_PREFIXES.contains(&parent_of(topic))
}

/// What a connection is allowed by its credentials.
#[derive(Debug, Clone)]
pub enum Permissions {
    /// Anywhere, except other clients' P2P topics and the presence topics.
    Anonymous,
    /// The key's publish and subscribe filter lists.
    Key(Arc<AccessKey>),
    /// Token mode: the union of the tokens' grants (each as far as its type allows).
    Tokens(Vec<HeldToken>),
    /// Device credential mode: anywhere under the declared parent topics, except other
    /// clients' P2P topics and the presence topics (as anonymous clients). Boxed: every
    /// connection holds its permissions, and most are not of this kind.
    Device(Box<DeviceGrant>),
}

/// The device credential a connection authenticated with, to check it again later.
#[derive(Debug, Clone)]
pub struct DeviceGrant {
    pub key_id: String,
    pub secret: Secret,
}

/// An authenticated client: who it is and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client_id: ClientId,
    pub permissions: Permissions,
    parents: Arc<Vec<String>>,
}

impl Principal {
    pub fn new(
        client_id: ClientId,
        permissions: Permissions,
        parents: Arc<Vec<String>>,
    ) -> Principal {
        Principal {
            client_id,
            permissions,
            parents,
        }
    }

    /// Whether this is a token-mode connection (which may publish to [`UPLOAD_TOKEN_TOPIC`]).
    pub fn is_token_mode(&self) -> bool {
        matches!(self.permissions, Permissions::Tokens(_))
    }

    /// Whether the connection relies on the registry (tokens, a device credential), and so
    /// must be re-checked when the registry changes or a token expires.
    pub fn relies_on_registry(&self) -> bool {
        matches!(
            self.permissions,
            Permissions::Tokens(_) | Permissions::Device(_)
        )
    }

    /// Checks that what the connection authenticated with is still valid at `now_ms`: every
    /// held token still issued and unexpired, the device credential not refreshed or removed.
    /// The error says why, for the log.
    pub fn still_valid(&self, registry: &AuthRegistry, now_ms: u64) -> Result<(), &'static str> {
        match &self.permissions {
            Permissions::Tokens(held) => {
                for token in held {
                    if !token.grant.valid_at(now_ms) {
                        return Err("a token of the connection expired");
                    }
                    if registry.token(token.token.expose()).is_none() {
                        return Err("a token of the connection was revoked");
                    }
                }
                Ok(())
            }
            Permissions::Device(grant) => match registry.credential_of_key(&grant.key_id) {
                Some(c) if c.secret == grant.secret && c.client_id == self.client_id.as_str() => {
                    Ok(())
                }
                Some(_) => Err("the device credential was refreshed"),
                None => Err("the device credential was unregistered"),
            },
            Permissions::Anonymous | Permissions::Key(_) => Ok(()),
        }
    }

    /// When the first of the connection's tokens expires (ms since the Unix epoch); `None`
    /// for connections without tokens.
    pub fn expires_at_ms(&self) -> Option<u64> {
        match &self.permissions {
            Permissions::Tokens(held) => held.iter().map(|t| t.grant.expire_at_ms).min(),
            _ => None,
        }
    }

    /// Adds a token given through [`UPLOAD_TOKEN_TOPIC`]. It replaces the held tokens whose
    /// type it covers (a new `W` token replaces the old `W` one; `RW` replaces all).
    pub fn add_token(&mut self, token: HeldToken) {
        if let Permissions::Tokens(held) = &mut self.permissions {
            held.retain(|old| !old.used_as.within(token.used_as));
            held.push(token);
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
        if is_broker_topic(topic) || !self.parent_declared(topic) {
            return false;
        }
        match &self.permissions {
            Permissions::Anonymous | Permissions::Device(_) => true,
            Permissions::Key(key) => key.publish.iter().any(|f| matches(f, topic)),
            Permissions::Tokens(held) => held
                .iter()
                .any(|t| t.used_as.write && t.grant.resources.iter().any(|f| matches(f, topic))),
        }
    }

    /// Whether this client may subscribe to `filter` (a valid filter).
    pub fn can_subscribe(&self, filter: &str) -> bool {
        if !self.parent_declared(filter) || self.names_foreign_p2p(filter) {
            return false;
        }
        match &self.permissions {
            Permissions::Anonymous | Permissions::Device(_) => {
                !PRESENCE_PREFIXES.contains(&parent_of(filter))
            }
            Permissions::Key(key) => key.subscribe.iter().any(|f| covers(f, filter)),
            Permissions::Tokens(held) => held
                .iter()
                .any(|t| t.used_as.read && t.grant.resources.iter().any(|f| covers(f, filter))),
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
