//! Every session, by client id.

use std::borrow::Borrow;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::session::Session;

/// The router's sessions: a hash table of the boxed sessions themselves, found by their own
/// `client_id`. A slot is 8 bytes, where a map from client id to session keeps a copy of the
/// id beside each box (32 bytes a slot, about 1.6 slots per session). A session's
/// `client_id` is its key here: it must not change while the session is in the table.
pub(crate) struct Sessions {
    table: HashTable<Box<Session>>,
    /// SipHash with random keys, as a `HashMap`'s: client ids come from the network.
    hasher: RandomState,
}

impl Sessions {
    pub(crate) fn new() -> Sessions {
        Sessions {
            table: HashTable::new(),
            hasher: RandomState::new(),
        }
    }

    /// Hashes as `str` (so does `ClientId`, which borrows as one).
    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    pub(crate) fn get<K: Borrow<str> + ?Sized>(&self, id: &K) -> Option<&Session> {
        let id = id.borrow();
        self.table
            .find(self.hash(id), |s| s.client_id.as_str() == id)
            .map(|s| &**s)
    }

    pub(crate) fn get_mut<K: Borrow<str> + ?Sized>(&mut self, id: &K) -> Option<&mut Session> {
        let id = id.borrow();
        let hash = self.hash(id);
        self.table
            .find_mut(hash, |s| s.client_id.as_str() == id)
            .map(|s| &mut **s)
    }

    /// Adds `session` under its client id; returns the one it replaces.
    pub(crate) fn insert(&mut self, session: Box<Session>) -> Option<Box<Session>> {
        let hash = self.hash(session.client_id.as_str());
        let hasher = &self.hasher;
        let entry = self.table.entry(
            hash,
            |s| s.client_id == session.client_id,
            |s| hasher.hash_one(s.client_id.as_str()),
        );
        match entry {
            Entry::Occupied(mut occupied) => Some(std::mem::replace(occupied.get_mut(), session)),
            Entry::Vacant(vacant) => {
                vacant.insert(session);
                None
            }
        }
    }

    pub(crate) fn remove<K: Borrow<str> + ?Sized>(&mut self, id: &K) -> Option<Box<Session>> {
        let id = id.borrow();
        let hash = self.hash(id);
        self.table
            .find_entry(hash, |s| s.client_id.as_str() == id)
            .ok()
            .map(|occupied| occupied.remove().0)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Session> {
        self.table.iter().map(|s| &**s)
    }
}

#[cfg(test)]
mod tests {
    use herald_protocol::ClientId;

    use super::*;

    fn session(id: &str, persistent: bool) -> Box<Session> {
        Session::new(ClientId::parse_any(id, 64).expect("client id"), persistent)
    }

    #[test]
    fn sessions_are_found_by_client_id_and_replaced_or_removed() {
        let mut sessions = Sessions::new();
        for n in 0..1000 {
            assert!(
                sessions
                    .insert(session(&format!("GID_x@@@dev-{n}"), false))
                    .is_none()
            );
        }
        assert_eq!(sessions.iter().count(), 1000);
        let id = ClientId::parse_any("GID_x@@@dev-7", 64).expect("client id");
        assert_eq!(
            sessions.get(&id).map(|s| s.client_id.as_str()),
            Some("GID_x@@@dev-7")
        );
        assert!(sessions.get("GID_x@@@dev-7").is_some_and(|s| !s.persistent));
        assert!(sessions.get("GID_x@@@dev-1000").is_none());
        // The same id again replaces the session.
        let old = sessions.insert(session("GID_x@@@dev-7", true));
        assert!(old.is_some_and(|s| !s.persistent));
        assert_eq!(sessions.iter().count(), 1000);
        assert!(sessions.get_mut(&id).is_some_and(|s| s.persistent));
        assert!(sessions.remove(&id).is_some_and(|s| s.persistent));
        assert!(sessions.remove(&id).is_none());
        assert!(sessions.get(&id).is_none());
        assert_eq!(sessions.iter().count(), 999);
    }
}
